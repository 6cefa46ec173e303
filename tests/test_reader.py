"""The phantom reader: shapes, and its accuracy on freshly generated held-out phantoms."""
import numpy as np
import pytest
import torch

from minroentgen import phantom as P
from minroentgen import reader as R


def test_shapes_and_targets():
    model = R.PhantomReader().eval()
    x = torch.rand(3, 1, 256, 256)
    out = model(x)
    assert {k: v.shape[1] for k, v in out.items()} == {k: len(v) for k, v in R.HEADS.items()}
    assert model.features(x).shape == (3, 512)
    labels = [{}, {"pleural_effusion": {"side": "bilateral", "size": "large"}, "support_devices": {"devices": ["pacemaker"]}}]
    t = R.targets(labels)
    assert t["present"].tolist() == [[0] * 7, [1, 0, 0, 0, 0, 1, 0]]
    assert t["effusion_side"].tolist() == [-1, 2] and t["devices"][1].tolist() == [0, 0, 1]
    assert torch.isfinite(R.loss_fn(out, R.targets(labels + [{}])))


def test_auroc():
    truth = np.array([0, 0, 1, 1], bool)
    assert R.auroc(np.array([0.1, 0.2, 0.3, 0.4]), truth) == 1.0
    assert R.auroc(np.array([0.4, 0.3, 0.2, 0.1]), truth) == 0.0
    assert R.auroc(np.ones(4), truth) == 0.5


@pytest.mark.slow
@pytest.mark.parametrize("size", [128, 256])
def test_reader_on_fresh_phantoms(size):
    """Issue 3: AUROC >= 0.95 per finding, >= 95% correct side for effusion and pneumothorax."""
    assert R.WEIGHTS.exists(), f"{R.WEIGHTS} is missing: run `python -m minroentgen.reader --train`"
    model = R.load()
    images, labels = R.phantoms(300, seed=424242, sizes=(size,))
    res = R.evaluate(model, images, labels)
    for f in P.FINDINGS:
        assert res[f"auroc/{f}"] >= 0.95, res
    assert res["acc/effusion_side"] >= 0.95 and res["acc/pneumothorax_side"] >= 0.95, res
    # mirroring the picture swaps the patient's sides: the reader must follow
    side = [i for i, lab in enumerate(labels) if lab.get("pleural_effusion", {}).get("side") in ("left", "right")]
    prob = R.predict(model, images[side][:, :, ::-1].copy())["effusion_side"].argmax(1)
    truth = torch.tensor([1 if labels[i]["pleural_effusion"]["side"] == "left" else 0 for i in side])
    assert (prob == truth).float().mean() >= 0.9
