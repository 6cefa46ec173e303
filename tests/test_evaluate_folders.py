"""evaluate.py --real-dir/--fake-dir (minroentgen/folders.py): reading, FID of folders, the
grouping of generated images by prompt and RoentGen's 4-image MS-SSIM, errors, and the xrv
features against torchxrayvision's own on random weights (skipped without torchxrayvision: it is
not in the [test] extra, since it pulls torchvision, scikit-image and pandas)."""
import csv
import json
from itertools import combinations

import numpy as np
import pytest
import torch
from PIL import Image

import evaluate as script
from minroentgen import folders as FE
from minroentgen import metrics as M
from minroentgen.phantoms import judge as E
from minroentgen.phantoms import phantom as P
from minroentgen.phantoms import reader as R


@pytest.fixture(autouse=True)
def _one_thread():
    """One thread for small convolutions on a busy CPU (as tests/test_evaluate.py)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def reader():
    if not R.WEIGHTS.exists():
        pytest.skip(f"{R.WEIGHTS} is missing: run `python -m minroentgen.phantoms.reader --train`")
    return R.load()


def save(folder, arrays, names):
    folder.mkdir(parents=True, exist_ok=True)
    for a, name in zip(arrays, names):
        Image.fromarray(a).save(folder / name)
    return folder


def run(argv, capsys):
    script.main([str(a) for a in argv])
    return capsys.readouterr()


# ----------------------------------------------------------------------------- reading

def test_read_gray_modes(tmp_path):
    rng = np.random.default_rng(0)
    g8 = rng.integers(0, 256, (20, 30), dtype=np.uint8)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    np.testing.assert_array_equal(FE.read_gray(tmp_path / "g8.png"), g8 / 255)
    rgb = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    luma = np.asarray(Image.fromarray(rgb).convert("L")) / 255  # ITU-R 601 luminance
    np.testing.assert_array_equal(FE.read_gray(tmp_path / "rgb.png"), luma)
    for top in (65535, 4095):  # full 16 bits, and 12-bit data in a 16-bit PNG
        g16 = rng.integers(0, top + 1, (20, 30)).astype(np.uint16)
        g16[0, 0] = top
        Image.fromarray(g16).save(tmp_path / f"g{top}.png")
        np.testing.assert_allclose(FE.read_gray(tmp_path / f"g{top}.png"), g16 / top, rtol=1e-12)
    Image.fromarray(g8).save(tmp_path / "g8.jpg", quality=95)
    assert np.abs(FE.read_gray(tmp_path / "g8.jpg") - g8 / 255).mean() < 0.1
    (tmp_path / "bad.png").write_bytes(b"not an image")
    with pytest.raises(FE.FolderError, match=r"cannot read image .*bad\.png"):
        FE.read_gray(tmp_path / "bad.png")


def test_center_crop_is_torchxrayvisions():
    """XRayCenterCrop: side min(H, W) from H // 2 - S // 2, W // 2 - S // 2 (odd excess too)."""
    x = torch.arange(7 * 10).view(7, 10)
    np.testing.assert_array_equal(FE.center_crop(x), x[:, 2:9])
    np.testing.assert_array_equal(FE.center_crop(x.T), x.T[2:9, :])
    y = torch.arange(6 * 9).view(6, 9)  # odd long side, even short one: 9 // 2 - 6 // 2 = 1
    np.testing.assert_array_equal(FE.center_crop(y), y[:, 1:7])


def scipy_resize(x: np.ndarray, size: int) -> np.ndarray:
    """skimage.transform.resize(mode="constant", preserve_range=True) by its documented steps:
    Gaussian sigma (factor - 1) / 2 where shrinking, ndimage.zoom order 1 with grid_mode and
    grid-constant, clip to the input's range (widened to cval 0 when the output reaches it)."""
    from scipy import ndimage
    factors = np.array(x.shape) / size
    y = x
    if (factors > 1).any():
        y = ndimage.gaussian_filter(x, np.maximum(0, (factors - 1) / 2), mode="constant", cval=0)
    y = ndimage.zoom(y, 1 / factors, order=1, mode="grid-constant", cval=0, grid_mode=True)
    lo, hi = x.min(), x.max()
    if not lo <= 0 <= hi and y.min() <= 0 <= y.max():
        lo, hi = min(lo, 0), max(hi, 0)
    return np.clip(y, lo, hi)


@pytest.mark.parametrize("shape", [(300, 300), (1000, 1000), (128, 128), (97, 131), (224, 224)])
def test_resize_matches_scipy(shape):
    rng = np.random.default_rng(shape[0])
    for lo in (-1024, 100):  # 0 inside the range, and all above it (the clip matters when growing)
        x = rng.uniform(lo, 1024, shape)
        ours = FE.resize_like_skimage(torch.from_numpy(x), 224).numpy()
        np.testing.assert_allclose(ours, scipy_resize(x, 224), rtol=0, atol=1e-9)
        assert ours.shape == (224, 224)


# ----------------------------------------------------------------------------- FID

def test_fid_of_folders(reader, tmp_path):
    """A folder with itself: FID 0. Two draws of one phantom distribution are closer than the same
    against another; the features are the judge's, so is the FID."""
    normal = [E.phantoms_like({}, 24, 128, s) for s in (1, 2)]
    effusion = E.phantoms_like({"pleural_effusion": {"side": "left", "size": "large"}}, 24, 128, 3)
    names = [f"{k:02d}.png" for k in range(24)]
    a, b, c = (save(tmp_path / n, imgs, names) for n, imgs in zip("abc", normal + [effusion]))
    ex = FE.reader_extractor(reader)
    same = FE.evaluate(a, a, lambda: ex, progress=False)
    assert abs(same["fid"]) < 1e-6 and same["n_real"] == same["n_fake"] == 24
    near, far = (FE.evaluate(a, d, lambda: ex, progress=False)["fid"] for d in (b, c))
    assert 0 < near and far > 3 * near, (near, far)
    judged = M.fid(E.read(reader, E.resize(normal[0], 128))[1],
                   E.read(reader, E.resize(effusion, 128))[1])
    assert far == pytest.approx(judged, rel=1e-5)


def test_reader_input_crops_then_resizes(reader):
    """A non-square image: centre square, then area averaging to 128 as judge.resize does."""
    img = np.random.default_rng(0).random((300, 256))
    x = FE.reader_extractor(reader).prepare(img)
    square = (img[22:278] * 255).round().astype(np.uint8)  # 300 // 2 - 128 = 22
    assert x.shape == (1, 128, 128)
    torch.testing.assert_close(x, E.resize(square[None], 128)[0], atol=0.5 / 255, rtol=0)


# ----------------------------------------------------------------------------- MS-SSIM

def roentgen_diversity(groups):
    """By hand: torchmetrics' MS-SSIM at its defaults (5 scales, data range 1) on each of a prompt's
    6 pairs, their mean, then mean and population sd over prompts."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm
    per = []
    for imgs in groups:
        x = torch.from_numpy(np.stack(imgs)).float().div(255)[:, None]
        per.append(np.mean([float(tm(x[i:i + 1], x[j:j + 1], data_range=1.0))
                            for i, j in combinations(range(4), 2)]))
    return float(np.mean(per)), float(np.std(per))


def test_ms_ssim_as_published_is_torchmetrics_defaults():
    """RoentGen called torchmetrics' MS-SSIM with its default betas, Wang's weights as printed
    (summing to 1.0001); metrics.ms_ssim renormalises them unless as_published (5 scales only)."""
    from torchmetrics.functional.image import multiscale_structural_similarity_index_measure as tm
    x = E.resize(np.stack(E.phantoms_like({"edema": {}}, 4, 256, 1)), 256).double()
    a, b = x[[0, 1]], x[[2, 3]]
    ref = tm(a, b, data_range=1.0, reduction="none")
    torch.testing.assert_close(M.ms_ssim(a, b, as_published=True), ref, rtol=1e-7, atol=1e-8)
    assert (M.ms_ssim(a, b) - ref).abs().min() > 1e-5  # renormalised: ~3e-5 apart
    small = x[..., :128, :128]  # 4 scales: renormalised either way
    torch.testing.assert_close(M.ms_ssim(small[:2], small[2:], as_published=True),
                               M.ms_ssim(small[:2], small[2:]))


def phantoms(labels, n, stream, size=192):  # 192 px: 5 MS-SSIM scales, torchmetrics' default
    return list(E.phantoms_like(labels, n, size, stream))


def test_sample_py_names_group_by_prompt(reader, tmp_path, capsys):
    edema, normal, small = phantoms({"edema": {}}, 5, 1), phantoms({}, 4, 2), phantoms({}, 3, 3)
    stray = phantoms({"cardiomegaly": {}}, 2, 4)
    # edema: seeds 0 and 1, image 1 of seed 0 taken twice (_v2); sorted by seed, image, version
    names = ["edema_seed1_img0.png", "edema_seed0_img1_v2.png", "edema_seed0_img1.png",
             "edema_seed0_img0.png", "edema_seed10_img0.png"]
    fake = save(tmp_path / "fake", edema, names)
    save(fake, normal, [f"normal-chest-radiograph_seed7_img{i}.png" for i in range(4)])
    save(fake, small, [f"small_seed0_img{i}.png" for i in range(3)])  # 3 images: skipped
    save(fake, stray, ["x.png", "grid_edema_seed0.png"])  # FID only; sample.py's grid: neither
    real = save(tmp_path / "real", phantoms({}, 6, 5), [f"r{k}.png" for k in range(6)])
    out = run(["--real-dir", real, "--fake-dir", fake, "--out", tmp_path / "eval"], capsys).out
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    m = res["ms_ssim"]
    assert res["n_fake"] == 5 + 4 + 3 + 1 and res["n_real"] == 6
    assert res["grouping"] == "sample.py names"
    assert (m["groups_used"], m["groups_skipped"]) == (2, 1)
    assert [r["prompt"] for r in m["prompts"]] == ["edema", "normal-chest-radiograph"]
    assert m["prompts"][0]["images"] == names[3:0:-1] + names[:1]
    mean, sd = roentgen_diversity([[edema[3], edema[2], edema[1], edema[0]], normal])
    assert m["mean"] == pytest.approx(mean, abs=1e-5) and m["std"] == pytest.approx(sd, abs=1e-5)
    assert 0.1 < mean < 0.95 and sd > 0
    assert f"{mean:.3f} ± {sd:.3f}" in out and "1 prompts with fewer than 4 images skipped" in out
    assert (tmp_path / "eval" / "table.md").read_text() in out


def test_reports_csv_groups_by_report(reader, tmp_path, capsys):
    """generate.py's layout: FAKE/reports.csv lists the images; a report's first 4 rows are used."""
    fake = tmp_path / "fake"
    imgs = phantoms({"edema": {}}, 6, 1) + phantoms({}, 3, 2)
    reports = ["Edema."] * 2 + ["Clear."] * 3 + ["Edema."] * 4  # 6 rows of Edema., interleaved
    save(fake / "images", imgs, [f"{k:05d}-0.png" for k in range(9)])
    order = [0, 1, 6, 7, 2, 3, 4, 5, 8]  # the CSV's row order differs from the file names'
    with open(fake / "reports.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["image", "report", "seed"])
        w.writerows([f"images/{k:05d}-0.png", reports[k], k] for k in order)
    save(fake, phantoms({}, 1, 9), ["not-listed.png"])  # not in reports.csv: not used
    real = save(tmp_path / "real", phantoms({}, 4, 5), [f"r{k}.png" for k in range(4)])
    run(["--real-dir", real, "--fake-dir", fake, "--out", tmp_path / "eval"], capsys)
    res = json.loads((tmp_path / "eval" / "results.json").read_text())
    m = res["ms_ssim"]
    assert res["n_fake"] == 9 and res["grouping"] == "reports.csv"
    assert (m["groups_used"], m["groups_skipped"]) == (1, 1)
    assert m["prompts"][0]["prompt"] == "Edema."
    assert m["prompts"][0]["images"] == [f"images/{k:05d}-0.png" for k in (0, 1, 6, 7)]
    mean, sd = roentgen_diversity([[imgs[k] for k in (0, 1, 6, 7)]])
    assert m["mean"] == pytest.approx(mean, abs=1e-5) and sd == m["std"] == 0


# ----------------------------------------------------------------------------- errors

def test_folder_errors(reader, tmp_path, capsys):
    imgs = phantoms({}, 4, 1, size=64)
    real = save(tmp_path / "real", imgs, [f"{k}.png" for k in range(4)])
    fake = save(tmp_path / "fake", imgs, [f"p_seed0_img{k}.png" for k in range(4)])

    def error(argv):  # argparse's errors go to stderr, sys.exit's ride on the exception
        with pytest.raises(SystemExit) as e:
            run(argv, capsys)
        err = e.value.code if isinstance(e.value.code, str) else capsys.readouterr().err
        assert err.strip().count("\n") == 0 or e.value.code == 2, err  # one line
        err = err.strip().splitlines()[-1]
        assert err.startswith("evaluate.py: error: "), err
        return err
    assert "--real-dir and --fake-dir go together" in error(["--real-dir", real])
    assert "--real-dir and --fake-dir go together" in error(["--fake-dir", fake])
    assert "--features needs --real-dir" in error(["--features", "xrv"])
    assert "--seeds is for a model's evaluation" in error(["--real-dir", real, "--fake-dir", fake,
                                                            "--seeds", "4"])
    assert "--real is for a model's" in error(["--real-dir", real, "--fake-dir", fake, "--real"])
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images")
    assert f"--real-dir {tmp_path / 'empty'} holds no PNG or JPEG images" in error(
        ["--real-dir", tmp_path / "empty", "--fake-dir", fake, "--out", tmp_path / "o1"])
    assert f"--fake-dir {tmp_path / 'nowhere'} does not exist" in error(
        ["--real-dir", real, "--fake-dir", tmp_path / "nowhere", "--out", tmp_path / "o2"])
    (real / "sub").mkdir()
    (real / "sub" / "._0.png").write_bytes(b"\x00\x05\x16\x07")  # macOS metadata: skipped
    save(real / "sub", imgs[:1], ["4.png"])  # subfolders are read
    (fake / "p_seed1_img0.png").write_bytes(b"\x89PNG broken")
    assert f"cannot read image {fake / 'p_seed1_img0.png'}" in error(
        ["--real-dir", real, "--fake-dir", fake, "--out", tmp_path / "o3"])
    (fake / "p_seed1_img0.png").unlink()
    save(fake, phantoms({}, 1, 2, size=96), ["p_seed0_img3.png"])  # one of a prompt's 4 larger
    assert "prompt 'p': its images differ in size (64x64, 64x64, 64x64, 96x96)" in error(
        ["--real-dir", real, "--fake-dir", fake, "--out", tmp_path / "o4"])
    one = save(tmp_path / "one", imgs[:1], ["0.png"])
    assert f"FID needs at least 2 images; --real-dir {one} holds 1" in error(
        ["--real-dir", one, "--fake-dir", real, "--out", tmp_path / "o5"])
    table = save(tmp_path / "table", imgs, [f"{k}.png" for k in range(4)])
    (table / "reports.csv").write_text("file,text\n0.png,Clear.\n")
    assert "needs the columns image and report" in error(
        ["--real-dir", real, "--fake-dir", table, "--out", tmp_path / "o6"])
    (table / "reports.csv").write_text("image,report\n0.png,Clear.\n9.png,Clear.\n")
    assert f"reports.csv line 3: no image at {table / '9.png'}" in error(
        ["--real-dir", real, "--fake-dir", table, "--out", tmp_path / "o7"])
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "results.json").write_text("{}")
    run(["--real-dir", real, "--fake-dir", real, "--out", tmp_path / "ok"], capsys)
    assert json.loads((tmp_path / "ok" / "results.json").read_text())["n_real"] == 5
    assert "old already holds results" in error(["--real-dir", real, "--fake-dir", real,
                                                 "--out", tmp_path / "old"])


def test_xrv_missing_says_how_to_install(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(__import__("sys").modules, "torchxrayvision", None)  # as if not installed
    with pytest.raises(FE.FolderError, match="needs torchxrayvision: pip install torchxrayvision "
                       r"\(its densenet121-res224-all weights, ~30 MB, download on first use\)"):
        FE.xrv_densenet()
    imgs = phantoms({}, 2, 1, size=64)
    real = save(tmp_path / "real", imgs, ["0.png", "1.png"])
    with pytest.raises(SystemExit, match="pip install torchxrayvision"):
        run(["--real-dir", real, "--fake-dir", real, "--features", "xrv", "--out", tmp_path / "o"],
            capsys)


# ----------------------------------------------------------------------------- xrv

@pytest.fixture(scope="module")
def xrv():
    try:
        import torchxrayvision
    except Exception as e:  # absent, or a torchvision that does not fit this torch
        pytest.skip(f"torchxrayvision is not importable here ({type(e).__name__}): "
                    "`pip install torchxrayvision` to run the parity test")
    return torchxrayvision


def xrv_reference(xrv, model, paths, maxval):
    """torchxrayvision's own recipe (its model card): skimage.io.imread, normalize, XRayCenterCrop,
    XRayResizer(224), DenseNet.features2."""
    import skimage.io
    batch = []
    for path, top in zip(paths, maxval):
        img = xrv.utils.normalize(skimage.io.imread(path), top)[None]  # (1, H, W)
        img = xrv.datasets.XRayResizer(224)(xrv.datasets.XRayCenterCrop()(img))
        batch.append(torch.from_numpy(img))
    with torch.no_grad():
        return model.features2(torch.stack(batch)).double()


def test_xrv_features_match_torchxrayvisions_on_random_weights(xrv, tmp_path, capsys,
                                                               monkeypatch):
    torch.manual_seed(0)
    model = xrv.models.DenseNet(weights=None).eval()  # its architecture, random weights
    rng = np.random.default_rng(0)
    shapes = [(128, 128), (224, 224), (301, 260), (261, 400), (512, 512)]  # grow, keep, shrink
    imgs = [E.phantom_at(P.sample_labels(rng), 256, rng) for _ in shapes]
    imgs = [np.asarray(Image.fromarray(a).resize(s[::-1])) for a, s in zip(imgs, shapes)]
    folder = save(tmp_path / "x", imgs, [f"{k}.png" for k in range(len(imgs))])
    g16 = (imgs[2].astype(np.uint32) * 257).astype(np.uint16)  # full 16-bit range
    g16[0, 0] = 65535
    Image.fromarray(g16).save(folder / "5.png")
    paths = FE.list_images(folder)
    ours = FE.extract(paths, FE.xrv_extractor(model), progress=False)
    ref = xrv_reference(xrv, model, paths, [255] * 5 + [65535])
    assert ours.shape == (6, 1024) and ref.std(0).mean() > 1e-3 * ref.abs().mean()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the command line builds the model with xrv_densenet(): here its random-weight stand-in
    monkeypatch.setattr(FE, "xrv_densenet", lambda weights=FE.XRV_WEIGHTS: model)
    fake = save(tmp_path / "fake", imgs[:4], [f"f{k}.png" for k in range(4)])  # no prompts
    out = run(["--real-dir", folder, "--fake-dir", fake, "--features", "xrv", "--out",
               tmp_path / "o"], capsys).out
    res = json.loads((tmp_path / "o" / "results.json").read_text())
    assert res["features"] == "xrv" and "DenseNet-121" in res["feature_extractor"]
    assert res["ms_ssim"]["groups_used"] == 0 and "MS-SSIM: no prompts found" in out
    assert res["fid"] == pytest.approx(M.fid(ref, ref[:4]), rel=1e-4)
