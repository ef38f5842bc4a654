"""Shared fixtures: where the real BraTS data lives, and small helpers."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path | None:
    env = os.environ.get("DIFFSEG_SHARED_DATA")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if (cand / "train").is_dir():
            return cand
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    d = shared_data_dir()
    if d is None:
        pytest.skip("real BraTS data not found: set DIFFSEG_SHARED_DATA or place it at ../shared/data")
    return d


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """A FLAIR-only `tiny` model with random non-trivial weights: (safetensors path, onnx path)."""
    import torch

    from diffseg_engine.export.onnx_export import export_onnx
    from diffseg_engine.train.presets import build_card, get_preset
    from diffseg_engine.train.unet import UNetModel
    from diffseg_engine.artifacts.weights import save_weights

    d = tmp_path_factory.mktemp("tiny_model")
    card = build_card(get_preset("tiny"), ("flair",))
    torch.manual_seed(0)
    net = UNetModel(card.architecture)
    with torch.no_grad():
        for p in net.parameters():  # output convs start at zero: perturb so outputs are not trivial
            p.add_(0.05 * torch.randn_like(p))
    weights = d / "tiny.safetensors"
    save_weights(weights, {k: v.numpy() for k, v in net.state_dict().items()}, card)
    return weights, export_onnx(weights, d / "tiny.onnx")


#: The case whose FLAIR the resume and adaptive-ensemble tests cut twelve slices from.
TWELVE_SLICES_CASE = "BraTS18_CBICA_ASK"


@pytest.fixture(scope="session")
def flair(shared_data, tmp_path_factory) -> Path:
    """Twelve axial slices (60-71) of a real FLAIR volume (`TWELVE_SLICES_CASE`), real header and affine, as
    `<case>_flair.nii.gz`: the input of the resume and adaptive-ensemble tests."""
    import nibabel as nib
    case = TWELVE_SLICES_CASE
    img = nib.load(str(shared_data / "train" / case / f"{case}_flair.nii.gz")).slicer[:, :, 60:72]
    path = tmp_path_factory.mktemp("input") / f"{case}_flair.nii.gz"
    nib.save(img, str(path))
    return path



def _chromium_paths() -> tuple[str, str] | None:
    """(browser, driver) of the Debian packages chromium and chromium-driver, or None."""
    import shutil
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@pytest.fixture(scope="session")
def chromium():
    """Headless Chromium driven by Selenium (the pages are tested as a user's browser renders them), with the
    browser console log readable through `driver.get_log("browser")`. `make test` installs the Debian packages
    chromium and chromium-driver where it can; without them these tests are skipped, saying so."""
    paths = _chromium_paths()
    if paths is None:
        pytest.skip("headless Chromium not found: apt-get install chromium chromium-driver (make test does)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    opts = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1400,1000", "--allow-file-access-from-files"):
        opts.add_argument(arg)
    opts.binary_location = paths[0]
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(paths[1]), options=opts)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()
