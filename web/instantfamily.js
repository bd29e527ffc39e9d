// InstantFamily nodes: browser extension.
// - colours the pack's nodes so the identity pipeline is easy to follow in a large graph;
// - lists the pack's workflows in the template browser in their intended order (main workflow first);
// - the region editor on "InstantFamily ID Regions": draw one box or ellipse per identity.
// No network access beyond ComfyUI's own API, no eval.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { ID_COLORS, idColor } from "./palette.js";

const PACK = "instantfamily_nodes";
const REGION_NODE = "InstantFamilyIDRegions";
const FORMAT_VERSION = 1;
const SNAP_MARGIN = 0.25;   // a box snapped to a detected face gets the paper's 25% margin
const MIN_SIZE = 0.02;      // smallest region side, as a fraction of the picture
const HANDLE_PX = 8;        // corner handle size in element pixels

// ------------------------------------------------------------------ template order
// ComfyUI lists a pack's workflows in file-system order; the file names start with their rank.
const getWorkflowTemplates = api.getWorkflowTemplates.bind(api);
api.getWorkflowTemplates = async function () {
    const lists = await getWorkflowTemplates();
    for (const [module, names] of Object.entries(lists)) {
        if (module === PACK || module.startsWith("instantfamily")) {
            names.sort((a, b) => a.localeCompare(b, undefined, { numeric: true }));
        }
    }
    return lists;
};

// ------------------------------------------------------------------ regions model

function parseRegions(text) {
    try {
        const data = JSON.parse(text || "{}");
        const list = Array.isArray(data) ? data : data.regions;
        if (!Array.isArray(list)) return [];
        return list
            .filter((r) => r && typeof r === "object" && [r.x, r.y, r.w, r.h].every(Number.isFinite))
            .map((r) => ({ ...r, shape: r.shape === "ellipse" ? "ellipse" : "rect" }))
            .sort((a, b) => a.id - b.id);
    } catch {
        return [];   // the backend reports invalid JSON with the reason; the editor starts empty
    }
}

function dumpRegions(regions) {
    const round = (v) => Math.round(v * 1e5) / 1e5;
    return JSON.stringify({
        version: FORMAT_VERSION,
        // every key of a region is kept (e.g. a per-person "prompt"); ids are 0..N-1 in order
        regions: regions.map((r, i) => ({ ...r, id: i, x: round(r.x), y: round(r.y), w: round(r.w), h: round(r.h) })),
    });
}

const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));

// Tell ComfyUI's change tracker about an edit: the workflow is marked modified, Save writes the new regions,
// and Ctrl+Z (ComfyUI's own undo, which sees every key press) undoes region edits like any other change.
// (The editor's pointer handlers cancel the mouse events the tracker would otherwise listen to.)
function trackChange() {
    app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}

// ------------------------------------------------------------------ the editor

class RegionEditor {
    constructor(node, widget) {
        this.node = node;
        this.widget = widget;          // the "regions" string widget (hidden; it holds the JSON)
        this.selected = -1;
        this.undoStack = [];
        this.faces = [];               // detected faces (normalised) from the last run, for snapping
        this.shape = "rect";
        this.drag = null;

        this.root = document.createElement("div");
        this.root.className = "instantfamily-region-editor";
        this.root.style.cssText = "display:flex;flex-direction:column;gap:4px;width:100%;height:100%;";
        const bar = document.createElement("div");
        bar.style.cssText = "display:flex;gap:4px;flex-wrap:wrap;font:12px sans-serif;";
        const button = (label, title, fn) => {
            const b = document.createElement("button");
            b.textContent = label;
            b.title = title;
            b.style.cssText = "padding:1px 6px;cursor:pointer;";
            b.addEventListener("click", (e) => { e.stopPropagation(); fn(); this.canvas.focus(); });
            bar.append(b);
            return b;
        };
        this.addButton = button("+ ID", "Add a region for the next identity", () => this.addRegion());
        this.shapeButton = button("▭ box", "Shape of new regions (and of the selected one)", () => this.toggleShape());
        button("Delete", "Delete the selected region (later IDs move down by one)", () => this.deleteSelected());
        button("Undo", "Undo the last region edit (Ctrl+Z, ComfyUI's undo, works too)", () => this.undo());
        this.root.append(bar);

        this.canvas = document.createElement("canvas");
        this.canvas.tabIndex = 0;
        this.canvas.dataset.instantfamilyRegions = String(node.id);
        this.canvas.style.cssText = "flex:1;width:100%;min-height:0;outline:none;background:#222;cursor:crosshair;";
        this.root.append(this.canvas);

        this.canvas.addEventListener("pointerdown", (e) => this.onPointerDown(e));
        this.canvas.addEventListener("pointermove", (e) => this.onPointerMove(e));
        this.canvas.addEventListener("pointerup", (e) => this.onPointerUp(e));
        this.canvas.addEventListener("keydown", (e) => this.onKeyDown(e));
        // the canvas graph must not see events meant for the editor (e.g. Delete would delete the node)
        for (const type of ["keydown", "keyup", "wheel", "contextmenu"]) {
            this.canvas.addEventListener(type, (e) => e.stopPropagation());
        }
        new ResizeObserver(() => this.draw()).observe(this.canvas);
    }

    get regions() { return parseRegions(this.widget.value); }

    setRegions(regions, { undoable = true } = {}) {
        const text = dumpRegions(regions);
        if (text === this.widget.value) return;
        if (undoable) this.undoStack.push(this.widget.value);
        if (this.undoStack.length > 100) this.undoStack.shift();
        this.widget.value = text;
        this.widget.callback?.(text);
        this.node.setDirtyCanvas?.(true, true);
        this.draw();
        trackChange();
    }

    undo() {
        if (!this.undoStack.length) return;
        this.widget.value = this.undoStack.pop();
        this.selected = Math.min(this.selected, this.regions.length - 1);
        this.node.setDirtyCanvas?.(true, true);
        this.draw();
        trackChange();
    }

    toggleShape() {
        this.shape = this.shape === "rect" ? "ellipse" : "rect";
        this.shapeButton.textContent = this.shape === "rect" ? "▭ box" : "◯ ellipse";
        const regions = this.regions;
        if (regions[this.selected]) {
            regions[this.selected].shape = this.shape;
            this.setRegions(regions);
        }
    }

    addRegion() {
        const regions = this.regions;
        const n = regions.length;
        // a free spot: regions side by side across the picture's upper half
        const w = 0.22, h = 0.3;
        const x = clamp(0.05 + (n % 4) * 0.24, 0, 1 - w), y = clamp(0.1 + Math.floor(n / 4) * 0.35, 0, 1 - h);
        regions.push({ id: n, shape: this.shape, x, y, w, h });
        this.selected = n;
        this.setRegions(regions);
    }

    deleteSelected() {
        const regions = this.regions;
        if (!regions[this.selected]) return;
        regions.splice(this.selected, 1);
        this.selected = -1;
        this.setRegions(regions);
    }

    // ---- geometry: the picture area inside the canvas element (letterboxed to the picture's aspect)

    background() {
        const slot = this.node.findInputSlot?.("image") ?? -1;
        const src = slot >= 0 ? this.node.getInputNode?.(slot) : null;
        const img = src?.imgs?.[0];
        return img && img.complete && img.naturalWidth ? img : null;
    }

    widgetNumber(name) {
        const w = this.node.widgets?.find((x) => x.name === name);
        const slot = this.node.findInputSlot?.(name) ?? -1;
        const link = slot >= 0 ? this.node.inputs[slot].link : null;
        if (link != null) {   // follow a link to a primitive (e.g. the workflow's one picture width)
            const src = this.node.getInputNode?.(slot);
            const v = src?.widgets?.find((x) => x.name === "value")?.value;
            if (Number.isFinite(v)) return v;
        }
        return Number(w?.value) || 0;
    }

    aspect() {
        const w = this.widgetNumber("width"), h = this.widgetNumber("height");
        if (w > 0 && h > 0) return w / h;
        const img = this.background();
        return img ? img.naturalWidth / img.naturalHeight : 1;
    }

    area() {
        const cw = this.canvas.width, ch = this.canvas.height, a = this.aspect();
        let w = cw, h = cw / a;
        if (h > ch) { h = ch; w = ch * a; }
        return { x: (cw - w) / 2, y: (ch - h) / 2, w, h };
    }

    toPicture(e) {
        const r = this.canvas.getBoundingClientRect();
        const px = (e.clientX - r.left) * (this.canvas.width / r.width);
        const py = (e.clientY - r.top) * (this.canvas.height / r.height);
        const a = this.area();
        return { x: (px - a.x) / a.w, y: (py - a.y) / a.h };
    }

    hit(p) {
        const regions = this.regions, a = this.area();
        const hx = HANDLE_PX / a.w, hy = HANDLE_PX / a.h;
        for (let i = regions.length - 1; i >= 0; i--) {   // topmost (last drawn) first
            const r = regions[i];
            const corners = [["nw", r.x, r.y], ["ne", r.x + r.w, r.y], ["sw", r.x, r.y + r.h], ["se", r.x + r.w, r.y + r.h]];
            for (const [c, x, y] of corners) {
                if (Math.abs(p.x - x) <= hx && Math.abs(p.y - y) <= hy) return { index: i, mode: c };
            }
            if (p.x >= r.x && p.x <= r.x + r.w && p.y >= r.y && p.y <= r.y + r.h) return { index: i, mode: "move" };
        }
        return null;
    }

    // ---- mouse and keyboard

    onPointerDown(e) {
        if (e.button !== 0) return;
        e.stopPropagation();
        e.preventDefault();
        this.canvas.focus();
        this.canvas.setPointerCapture?.(e.pointerId);
        const p = this.toPicture(e);
        const regions = this.regions;
        const h = this.hit(p);
        if (h) {
            this.selected = h.index;
            this.drag = { ...h, start: p, orig: { ...regions[h.index] }, before: this.widget.value };
        } else if (p.x >= 0 && p.x <= 1 && p.y >= 0 && p.y <= 1) {
            // drawing a new region: the next identity
            regions.push({ id: regions.length, shape: this.shape, x: p.x, y: p.y, w: 0, h: 0 });
            this.selected = regions.length - 1;
            this.drag = { index: this.selected, mode: "se", start: p, orig: { ...regions[this.selected] },
                          before: this.widget.value, created: true, live: regions };
        } else {
            this.selected = -1;
        }
        this.draw();
    }

    dragged(p) {
        const d = this.drag, o = d.orig;
        const dx = p.x - d.start.x, dy = p.y - d.start.y;
        let { x, y, w, h } = o;
        if (d.mode === "move") {
            x = clamp(o.x + dx, -o.w + MIN_SIZE, 1 - MIN_SIZE);
            y = clamp(o.y + dy, -o.h + MIN_SIZE, 1 - MIN_SIZE);
        } else {
            let x0 = o.x, y0 = o.y, x1 = o.x + o.w, y1 = o.y + o.h;
            if (d.mode.includes("w")) x0 += dx; else x1 += dx;
            if (d.mode.includes("n")) y0 += dy; else y1 += dy;
            x0 = clamp(x0, 0, 1); x1 = clamp(x1, 0, 1); y0 = clamp(y0, 0, 1); y1 = clamp(y1, 0, 1);
            x = Math.min(x0, x1); y = Math.min(y0, y1); w = Math.abs(x1 - x0); h = Math.abs(y1 - y0);
        }
        return { ...o, x, y, w, h };
    }

    onPointerMove(e) {
        if (!this.drag) {
            const h = this.hit(this.toPicture(e));
            this.canvas.style.cursor = !h ? "crosshair" : h.mode === "move" ? "move"
                : (h.mode === "nw" || h.mode === "se") ? "nwse-resize" : "nesw-resize";
            return;
        }
        e.stopPropagation();
        const regions = this.drag.live ?? this.regions;
        regions[this.drag.index] = this.dragged(this.toPicture(e));
        this.preview = regions;
        this.draw();
    }

    onPointerUp(e) {
        if (!this.drag) return;
        e.stopPropagation();
        const d = this.drag;
        const regions = d.live ?? this.regions;
        let r = this.dragged(this.toPicture(e));
        this.drag = null;
        this.preview = null;
        const changed = ["x", "y", "w", "h"].some((k) => r[k] !== d.orig[k]);
        if (d.created && (r.w < MIN_SIZE || r.h < MIN_SIZE)) {   // a click on empty canvas: no region
            this.selected = -1;
            this.draw();
            return;
        }
        if (!changed) { this.draw(); return; }   // a click on a region selects it
        r = { ...r, w: Math.max(r.w, MIN_SIZE), h: Math.max(r.h, MIN_SIZE) };
        regions[d.index] = this.snap(r);
        this.setRegions(regions);   // the widget still holds the state before the drag: that is the undo step
    }

    snap(r) {
        // snap to a detected face whose centre lies in the region (the last run's faces, in the image)
        if (!this.faces.length || !this.background()) return r;
        for (const f of this.faces) {
            const cx = f.x + f.w / 2, cy = f.y + f.h / 2;
            if (cx >= r.x && cx <= r.x + r.w && cy >= r.y && cy <= r.y + r.h) {
                const mx = f.w * SNAP_MARGIN / 2, my = f.h * SNAP_MARGIN / 2;
                const x = clamp(f.x - mx, 0, 1), y = clamp(f.y - my, 0, 1);
                return { ...r, x, y, w: clamp(f.x + f.w + mx, 0, 1) - x, h: clamp(f.y + f.h + my, 0, 1) - y };
            }
        }
        return r;
    }

    onKeyDown(e) {
        if ((e.key === "Delete" || e.key === "Backspace") && this.selected >= 0) {
            e.preventDefault();
            this.deleteSelected();
        } else if (e.key === "Escape") {
            this.selected = -1;
            this.draw();
        }
    }

    // ---- drawing

    draw() {
        const c = this.canvas;
        const dpr = window.devicePixelRatio || 1;
        const w = Math.max(1, Math.round(c.clientWidth * dpr)), h = Math.max(1, Math.round(c.clientHeight * dpr));
        if (c.width !== w || c.height !== h) { c.width = w; c.height = h; }
        const ctx = c.getContext("2d");
        ctx.clearRect(0, 0, c.width, c.height);
        const a = this.area();
        const img = this.background();
        if (img) ctx.drawImage(img, a.x, a.y, a.w, a.h);
        else { ctx.fillStyle = "#555"; ctx.fillRect(a.x, a.y, a.w, a.h); }
        c.dataset.area = [a.x / c.width, a.y / c.height, a.w / c.width, a.h / c.height].join(",");
        const regions = this.preview ?? this.regions;
        regions.forEach((r, i) => {
            const x = a.x + r.x * a.w, y = a.y + r.y * a.h, rw = r.w * a.w, rh = r.h * a.h;
            ctx.beginPath();
            if (r.shape === "ellipse") ctx.ellipse(x + rw / 2, y + rh / 2, Math.abs(rw / 2), Math.abs(rh / 2), 0, 0, 2 * Math.PI);
            else ctx.rect(x, y, rw, rh);
            ctx.fillStyle = idColor(i, 0.3);
            ctx.fill();
            ctx.lineWidth = (i === this.selected ? 3 : 2) * dpr;
            ctx.strokeStyle = idColor(i, 1);
            ctx.stroke();
            if (i === this.selected) {
                ctx.strokeStyle = "white";
                ctx.lineWidth = 1 * dpr;
                ctx.strokeRect(x, y, rw, rh);
                ctx.fillStyle = "white";
                for (const [hx, hy] of [[x, y], [x + rw, y], [x, y + rh], [x + rw, y + rh]]) {
                    ctx.fillRect(hx - HANDLE_PX / 2, hy - HANDLE_PX / 2, HANDLE_PX, HANDLE_PX);
                }
            }
            const label = `ID ${i}` + (r.prompt ? `: ${r.prompt}` : "");
            ctx.font = `${12 * dpr}px sans-serif`;
            const tw = ctx.measureText(label).width;
            ctx.fillStyle = idColor(i, 1);
            ctx.fillRect(x, y, tw + 8 * dpr, 16 * dpr);
            const [cr, cg, cb] = ID_COLORS[i % ID_COLORS.length];
            ctx.fillStyle = cr * 0.299 + cg * 0.587 + cb * 0.114 > 150 ? "black" : "white";
            ctx.fillText(label, x + 4 * dpr, y + 12 * dpr);
        });
    }
}

function setUpRegionEditor(node) {
    const widget = node.widgets?.find((w) => w.name === "regions");
    if (!widget || node.instantfamilyEditor) return;
    widget.hidden = true;   // still saved in the workflow and sent in the prompt
    widget.computeSize = () => [0, -4];   // and takes no row
    const editor = new RegionEditor(node, widget);
    node.instantfamilyEditor = editor;
    const dom = node.addDOMWidget("region_editor", "instantfamily_region_editor", editor.root, {
        serialize: false,
        hideOnZoom: false,
        getValue() { return undefined; },
        setValue() {},
    });
    dom.serialize = false;   // not a value: neither in widgets_values nor in the API prompt
    dom.computeLayoutSize = () => ({ minHeight: 260, minWidth: 260 });
    const w0 = Math.max(node.size[0], 340), h0 = Math.max(node.size[1], 420);
    node.setSize?.([w0, h0]);
    editor.draw();
}

app.registerExtension({
    name: "instantfamily.nodes",
    async beforeRegisterNodeDef(nodeType, nodeData) {
        if (!nodeData.category?.startsWith("InstantFamily")) return;
        const onNodeCreated = nodeType.prototype.onNodeCreated;
        nodeType.prototype.onNodeCreated = function () {
            const r = onNodeCreated?.apply(this, arguments);
            this.color = "#2a363b";
            this.bgcolor = "#3f5159";
            if (nodeData.name === REGION_NODE) setUpRegionEditor(this);
            return r;
        };
        if (nodeData.name !== REGION_NODE) return;
        const onExecuted = nodeType.prototype.onExecuted;
        nodeType.prototype.onExecuted = function (message) {
            const r = onExecuted?.apply(this, arguments);
            if (this.instantfamilyEditor) {
                this.instantfamilyEditor.faces = message?.instantfamily_faces ?? [];
                this.instantfamilyEditor.draw();
            }
            return r;
        };
        const onConfigure = nodeType.prototype.onConfigure;
        nodeType.prototype.onConfigure = function () {
            const r = onConfigure?.apply(this, arguments);
            this.instantfamilyEditor?.draw();   // regions loaded from a saved workflow
            return r;
        };
        const onConnectionsChange = nodeType.prototype.onConnectionsChange;
        nodeType.prototype.onConnectionsChange = function () {
            const r = onConnectionsChange?.apply(this, arguments);
            this.instantfamilyEditor?.draw();
            return r;
        };
        // the background may change (an upstream preview arrives); redraw with the graph, cheaply
        const onDrawForeground = nodeType.prototype.onDrawForeground;
        nodeType.prototype.onDrawForeground = function () {
            const r = onDrawForeground?.apply(this, arguments);
            const ed = this.instantfamilyEditor;
            const img = ed?.background();
            if (ed && (img?.src ?? null) !== (ed.lastBackground ?? null)) {
                ed.lastBackground = img?.src ?? null;
                ed.draw();
            }
            return r;
        };
    },
});
