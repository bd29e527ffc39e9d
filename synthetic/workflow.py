"""The synthetic world's ComfyUI workflow (API format), built from the pack's nodes and ComfyUI's core nodes.

One graph serves ``bench/synthetic.py`` (identity accuracy by position) and the demo's world picture
(``python -m instantfamily_nodes.demo`` with the world model cached): reference portraits -> *Encode
Faces* with the world's insightface-shaped pack -> *Project IDs* -> *Embedding Stack*; the scene's pose
JSON -> *Pose From JSON* -> *Pose Control + ID Masks*; *InstantFamily Apply* with the world ControlNet;
KSampler; VAE Decode.
"""
from __future__ import annotations

PACK = "synthetic_world"     # the world's face pack, as the Face Encoder Loader lists it


def world_prompt(refs: list[str], pose_file: str, hw: tuple[int, int], caption: str, names: dict[str, str],
                 unmasked: bool = False, second_model: bool = False, steps: int = 20, seed: int = 0,
                 cfg: float = 5.0) -> dict:
    """The API prompt: ``refs`` (input-folder image names, one portrait per person, ID order), the pose
    JSON at ``pose_file`` (normalised OpenPose keypoints, people left to right), the picture size ``hw``,
    the caption; ``names`` maps checkpoint / controlnet / weights (and *_unmasked) to loader names.
    ``unmasked``: all-ones ID masks (stacking without masks); ``second_model``: the *_unmasked files;
    ``cfg``: the sampler's guidance scale (the negative carries null IDs, so it scales identity too).
    Node "20" saves the picture (prefix ``world/image``), node "21" the pose/ID-mask preview."""
    n = len(refs)
    h, w = hw
    wkey, ckey = ("weights_unmasked", "controlnet_unmasked") if second_model else ("weights", "controlnet")
    p: dict[str, dict] = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": caption}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "8": {"class_type": "InstantFamilyFaceEncoderLoader",
              "inputs": {"backend": "insightface", "model_name": PACK, "provider": "CPU", "det_sizes": "640, 480, 320"}},
        "10": {"class_type": "InstantFamilyWeightsLoader", "inputs": {"weights_name": names[wkey]}},
        "13": {"class_type": "InstantFamilyPoseFromJSON",
               "inputs": {"path": pose_file, "coords": "normalized", "canvas_width": w, "canvas_height": h}},
        "15": {"class_type": "InstantFamilyControlNetLoader", "inputs": {"control_net_name": names[ckey]}},
        "17": {"class_type": "EmptyLatentImage", "inputs": {"width": w, "height": h, "batch_size": 1}},
    }
    for i, r in enumerate(refs):
        p[f"r{i}"] = {"class_type": "LoadImage", "inputs": {"image": r}}
    batch = ["r0", 0]
    for i in range(1, n):   # all portraits have one size: one image batch, one face each, in ID order
        p[f"b{i}"] = {"class_type": "ImageBatch", "inputs": {"image1": batch, "image2": [f"r{i}", 0]}}
        batch = [f"b{i}", 0]
    p["9"] = {"class_type": "InstantFamilyEncodeFaces",
              "inputs": {"face_encoder": ["8", 0], "images": batch, "faces_per_image": "auto",
                         "id_order": "left_to_right", "index_list": ""}}
    p["11"] = {"class_type": "InstantFamilyProjectIDs", "inputs": {"faces": ["9", 0], "weights": ["10", 0]}}
    p["12"] = {"class_type": "InstantFamilyEmbeddingStack",
               "inputs": {"positive": ["2", 0], "negative": ["3", 0], "ids": ["11", 0], "weights": ["10", 0]}}
    p["14"] = {"class_type": "InstantFamilyPoseControl",
               "inputs": {"pose": ["13", 0], "faces": ["9", 0], "id_count": n, "person_ids": "left_to_right",
                          "frame": 0, "width": w, "height": h, "circle_scale": 0.2, "margin": 0.25,
                          "mask_shape": "rect", "feather": 0, "hands": False, "face_keypoints": False}}
    masks = ["14", 1]
    if unmasked:   # all-ones masks for every ID: stacking without masks (core nodes only)
        p["u1"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": w, "height": h}}
        p["u2"] = {"class_type": "MaskToImage", "inputs": {"mask": ["u1", 0]}}
        p["u3"] = {"class_type": "RepeatImageBatch", "inputs": {"image": ["u2", 0], "amount": n}}
        p["u4"] = {"class_type": "ImageToMask", "inputs": {"image": ["u3", 0], "channel": "red"}}
        masks = ["u4", 0]
    p["16"] = {"class_type": "InstantFamilyApply",
               "inputs": {"model": ["1", 0], "positive": ["12", 0], "negative": ["12", 1], "masks": masks,
                          "strength": 1.0, "id_strengths": "", "start_percent": 0.0, "end_percent": 1.0,
                          "attention_mode": "from weights", "weights": ["10", 0], "control_net": ["15", 0],
                          "image": ["14", 0], "control_strength": 1.0}}
    p["18"] = {"class_type": "KSampler",
               "inputs": {"model": ["16", 0], "positive": ["16", 1], "negative": ["16", 2], "latent_image": ["17", 0],
                          "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
                          "denoise": 1.0}}
    p["19"] = {"class_type": "VAEDecode", "inputs": {"samples": ["18", 0], "vae": ["1", 2]}}
    p["20"] = {"class_type": "SaveImage", "inputs": {"images": ["19", 0], "filename_prefix": "world/image"}}
    p["21"] = {"class_type": "SaveImage", "inputs": {"images": ["14", 2], "filename_prefix": "world/pose_masks"}}
    return p



def roundtrip_prompt(image: str, names: dict[str, str]) -> dict:
    """The world's own render of a scene through the checkpoint's VAE (encode, decode): how much identity
    survives the latent space at all, an upper bound for any model sampling in it. Node "20" saves it."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": names["checkpoint"]}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}},
        "3": {"class_type": "VAEEncode", "inputs": {"pixels": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0], "vae": ["1", 2]}},
        "20": {"class_type": "SaveImage", "inputs": {"images": ["4", 0], "filename_prefix": "world/roundtrip"}},
    }
