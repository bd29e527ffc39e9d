// InstantFamily nodes: browser extension. Colours each node's title bar in the pack's colour so the
// identity pipeline is easy to follow in a large graph.
import { app } from "../../scripts/app.js";

app.registerExtension({
    name: "instantfamily.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.category?.startsWith("InstantFamily")) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated?.apply(this, arguments);
            this.color = "#2a363b";
            this.bgcolor = "#3f5159";
            return r;
        };
    },
});
