import io
import os

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")


def encode(pixels: np.ndarray | Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    image = pixels if isinstance(pixels, Image.Image) else Image.fromarray(pixels)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture(scope="session")
def sample_dirs(tmp_path_factory):
    """Bundled samples written to disk once per session: real images for pre-training and a labelled set."""
    from lida_core import samples

    root = tmp_path_factory.mktemp("samples")
    samples.write_samples(str(root / "pretrain"), 24, sources=["real"], start=20000)
    samples.write_samples(str(root / "labelled"), 6)
    return root


LIDA = str(__import__("pathlib").Path(__import__("sys").executable).with_name("lida"))


def run_lida(ws, *args, check=True, env=None, timeout=900):
    """The installed command with --json, as a user runs it; raises with its stderr on failure."""
    import subprocess

    full_env = dict(os.environ, **(env or {}))
    result = subprocess.run([LIDA, "--workspace", str(ws), "--json", *args], capture_output=True, text=True,
                            timeout=timeout, env=full_env)
    if check and result.returncode != 0:
        raise AssertionError(f"lida {' '.join(args)} failed ({result.returncode}):\n"
                             f"stdout: {result.stdout[-1000:]}\nstderr: {result.stderr[-3000:]}")
    return result


def json_out(result):
    import json

    return json.loads(result.stdout.strip().splitlines()[-1])
