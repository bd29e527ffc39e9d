"""A synthetic world where identity is exactly measurable: procedural faces on stick people.

It is not SD1.5 and not photographs. It exists so the whole InstantFamily method (recognition features,
masked attention, the trainer, the nodes, the evaluation) can be shown to work end to end on a CPU, with
identity scored by a recognition net that is right almost every time on held-out appearances.

- :mod:`.world`: identities, appearances, scenes (OpenPose-18 people, face boxes, captions);
- :mod:`.detector`: an SCRFD-shaped ONNX face detector that boxes the world's faces exactly;
- :mod:`.recognizer`: an ArcFace-shaped recognition net trained on the world, exported as an
  insightface-shaped pack that the pack's face encoding loads through its normal path;
- :mod:`.dataset`: scenes written as a ``train prepare`` input folder;
- :mod:`.score`: identity accuracy by position (crop at the asked box, classify with the world's net).

Commands: ``python -m instantfamily_nodes.synthetic {recognizer,scenes}``; measurement: ``bench/synthetic.py``.
"""
