"""Deep Model Reassembly end to end on real torchvision/timm architectures (random weights) and an imagefolder.

The zoo is four real families at 64×64 — a ResNet, a ConvNeXt (weights from a local checkpoint, through
timm's ``checkpoint_path``), a MobileNetV3 and a ViT (tokens) — so tracing, cut points, CKA across layouts
(NCHW maps, NHWC maps, tokens) and the stitches between them all run on real graphs, not the demo zoo.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.cli import run_cli

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

CLASSES, PER_CLASS, SIZE = 3, 24, 64


def make_imagefolder(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS, size: int = SIZE,
                     seed: int = 0) -> Path:
    """ROOT/class<c>/<i>.png: RGB images of sine stripes whose orientation is the class (0°, 60°, 120°), with a
    random period, phase and tint and uniform noise per image. Random-weight zoo models separate them only
    partly (linear probes from chance to 100%, depending on the random weights), so the probe, the selection and
    the tuning have work; accuracy is only checked to be a fraction (15 test images, random-weight zoo)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    for c in range(classes):
        folder = root / f"class{c}"
        folder.mkdir(parents=True)
        theta = np.pi * c / classes
        for i in range(per_class):
            period = rng.uniform(6, 10)
            coord = np.cos(theta) * xx + np.sin(theta) * yy + rng.uniform(0, period)
            stripes = np.sin(2 * np.pi * coord / period)[..., None]
            img = rng.uniform(0.3, 0.7, 3) + 0.3 * stripes + rng.uniform(-0.1, 0.1, (size, size, 3))
            Image.fromarray((np.clip(img, 0, 1) * 255).astype(np.uint8), "RGB").save(folder / f"{i:03d}.png")
    return root


def test_assemble_real_architectures_on_imagefolder(tmp_path):
    import onnxruntime as ort
    import timm

    from zoocompiler.core.cache import weights_hash
    from zoocompiler.data import load_dataset

    data = make_imagefolder(tmp_path / "images")
    torch.manual_seed(123)
    convnext = timm.create_model("convnext_atto", num_classes=CLASSES).eval()
    checkpoint = tmp_path / "convnext_atto.pt"
    torch.save(convnext.state_dict(), checkpoint)

    specs = [
        f"torchvision:resnet18,num_classes={CLASSES}",
        f"timm:convnext_atto,num_classes={CLASSES},checkpoint_path={checkpoint}",
        f"torchvision:mobilenet_v3_small,num_classes={CLASSES}",
        f"timm:vit_tiny_patch16_224,img_size={SIZE},num_classes={CLASSES}",
    ]
    out = tmp_path / "asm"
    code, stdout, stderr = run_cli(
        "assemble", "--zoo", ",".join(specs), "--data", f"imagefolder:{data}", "--budget", "flops=60M",
        "--tune", "frozen", "--epochs", "1", "--top", "5", "--restarts", "20", "--out", out,
        "--cache-dir", tmp_path / "cache", "--json",
    )
    assert code == 0, stderr
    printed = json.loads(stdout)
    report = json.loads((out / "report.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    assert (out / "model.onnx").is_file() and (out / "assembly.safetensors").is_file()

    # the zoo is the four real architectures, the ConvNeXt with the checkpoint's weights
    assert report["zoo"] == specs
    hashes = {entry["spec"]: entry["weights_sha256"] for entry in plan["zoo"]}
    assert hashes[specs[1]] == weights_hash(convnext)

    # the chosen blocks come from them, one per stage, under the MAC budget (60M: ResNet-18 and the ViT do not fit
    # whole, so only their blocks can be used)
    chosen = report["chosen"]
    assert [b["stage"] for b in chosen] == list(range(len(chosen))) and len(chosen) >= 2
    assert {b["model"] for b in chosen} <= set(specs)
    assert all(b["params"] >= 0 and b["macs"] >= 0 for b in chosen)
    assert 0 < report["macs"] <= 60e6
    assert printed["chosen"] == chosen
    assert any(c["source"] == "ilp" for c in report["candidates"])  # stitched reassemblies were built and scored

    for key in ("accuracy", "accuracy_before_tuning"):
        assert isinstance(report[key], float) and 0.0 <= report[key] <= 1.0, (key, report[key])

    export = report["export"]
    assert export["max_abs_diff"] <= export["tolerance"], export
    timings = report["timings"]
    assert set(timings) >= {"analysis_s", "ilp_s", "export_s"} and all(t >= 0 for t in timings.values())

    # the ONNX model classifies the dataset's test images into the 3 classes
    test = load_dataset(f"imagefolder:{data}", "test")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {session.get_inputs()[0].name: test.x[:5].numpy()})
    assert logits.shape == (5, CLASSES) and np.isfinite(logits).all()
