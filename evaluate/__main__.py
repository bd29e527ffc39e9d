"""python -m instantfamily_nodes.evaluate RUN_FOLDER [options]

Scores generated images against one reference photo per ID and writes, into RUN_FOLDER/eval/ (or
--out): scores.json, images.csv, faces.csv, summary.md and contact_sheet*.png.

  RUN_FOLDER/refs/           one photo per ID (ID order = file-name order)
  RUN_FOLDER/gen/            generated images
  RUN_FOLDER/manifest.json   optional: per image prompt, ids, boxes | points | masks
  RUN_FOLDER/prompts.json|txt optional without a manifest

Identity: --backend dlib (offline default), insightface (antelopev2/buffalo_l), facenet (the paper's;
needs the vggface2 weights). Prompt: TextSim with CLIP ViT-L/14 when its weights are on disk.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..models.faces.errors import FaceEncodingError
from .errors import EvaluationInputError
from .identity import BACKENDS
from .matching import DEFAULT_MIN_OVERLAP
from .score import MATCH_MODES


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m instantfamily_nodes.evaluate", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="run folder (refs/, gen/, optional manifest.json or prompts.json/txt)")
    ap.add_argument("--refs", help="reference folder (default RUN/refs)")
    ap.add_argument("--gen", help="generated-image folder when there is no manifest (default RUN/gen)")
    ap.add_argument("--manifest", help="manifest JSON (default RUN/manifest.json when present)")
    ap.add_argument("--out", help="output folder (default RUN/eval)")
    ap.add_argument("--backend", choices=BACKENDS, default="dlib", help="face backend (default dlib, offline)")
    ap.add_argument("--insightface-root", help="folder holding models/<name>/*.onnx (default ~/.insightface)")
    ap.add_argument("--insightface-model", default="antelopev2", help="insightface pack name (default antelopev2)")
    ap.add_argument("--facenet-weights", help="path of 20180402-114759-vggface2.pt (default: $TORCH_HOME/checkpoints)")
    ap.add_argument("--clip", help="local CLIP folder for TextSim; default: the cached openai/clip-vit-large-patch14; "
                                   "'none' switches TextSim off")
    ap.add_argument("--match", choices=MATCH_MODES, default="auto",
                    help="faces to IDs: regions (masks/boxes/points from the manifest), greedy (similarity), "
                         "auto (regions when given)")
    ap.add_argument("--min-overlap", type=float, default=DEFAULT_MIN_OVERLAP,
                    help="least overlap of a face with its ID's region to count as that ID's face")
    ap.add_argument("--det-threshold", type=float,
                    help="face detection threshold (default: dlib 0.1 HOG margin, insightface 0.5, facenet 0 = "
                         "MTCNN's own stage thresholds)")
    ap.add_argument("--device", default="cpu", help="torch device for facenet and CLIP (cpu, cuda)")
    ap.add_argument("--no-sheet", action="store_true", help="skip the contact sheet")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _run(args)
    except (EvaluationInputError, FaceEncodingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from . import report
    from .identity import encode_references, make_encoder
    from .inputs import load_eval_set, load_image
    from .run import Request, evaluate
    from .textsim import load_textsim

    if not 0.0 < args.min_overlap <= 1.0:
        raise EvaluationInputError(f"--min-overlap must be in (0, 1], got {args.min_overlap}")
    es = load_eval_set(args.run, refs=args.refs, gen=args.gen, manifest=args.manifest)
    out = Path(args.out) if args.out else es.root / "eval"
    out.mkdir(parents=True, exist_ok=True)
    print(f"{len(es.ref_files)} references ({', '.join(es.id_names)}), {len(es.items)} generated images", flush=True)
    encoder = make_encoder(args.backend, insightface_root=args.insightface_root,
                           insightface_model=args.insightface_model, facenet_weights=args.facenet_weights,
                           device=args.device, det_threshold=args.det_threshold)
    ref_images = [load_image(f) for f in es.ref_files]
    refs = encode_references(encoder, ref_images, [f.name for f in es.ref_files])
    ts = load_textsim(args.clip, device=args.device) if es.has_prompts else None
    if ts is not None:
        print(ts.message, flush=True)
    elif not es.has_prompts:
        print("TextSim skipped: no prompts (add them to the manifest, prompts.json or prompts.txt)", flush=True)

    requests = [Request(name=it.name, image=(lambda f=it.file: load_image(f)), ids=it.ids, prompt=it.prompt,
                        regions=it.regions) for it in es.items]
    bar = tqdm(total=len(requests), desc=f"scoring ({encoder.name})", unit="img")
    result = evaluate(encoder, refs, es.id_names, requests, match=args.match, min_overlap=args.min_overlap,
                      textsim=ts, progress=lambda done: bar.update(done - bar.n))
    bar.close()
    if ts is None and not es.has_prompts:
        result.meta["text_sim"] = "TextSim skipped: no prompts"
    result.meta["command"] = " ".join(["python -m instantfamily_nodes.evaluate", *sys.argv[1:]])
    written = [report.write_json(result, out / "scores.json"), *report.write_csv(result, out)]
    (out / "summary.md").write_text(report.summary_markdown(result), encoding="utf-8")
    written.append(out / "summary.md")
    if not args.no_sheet:
        written += report.contact_sheets(result, lambda k: load_image(es.items[k].file), out)
    print()
    print(report.summary_markdown(result))
    print("written:\n  " + "\n  ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
