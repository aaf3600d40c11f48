"""lida: attribution of AI-generated images as retrieval over low-bit fingerprints."""

from setuptools import find_packages, setup

# Bounds are the ranges tested together; exact pins for reproducible installs live in
# requirements.lock, which `make setup` passes to pip as constraints.
INSTALL_REQUIRES = [
    "torch>=2.13,<2.14",  # CPU wheel on local disk; an unbounded torch pulls a multi-GB CUDA build
    "numpy>=2.0,<2.5",  # Beam caps numpy<2.5
    "pillow>=11,<13",  # Beam caps pillow<13; the one image decoder
    "simplejpeg>=1.9,<1.10",  # Pillow's JPEG pixels, decoded in half the time (lida_core/decode.py)
    "pyarrow>=18,<26",  # Beam caps pyarrow<26
    "apache-beam>=2.77,<2.78",
    "prefect>=3.9,<3.10",
    "webdataset>=1.0.2,<1.1",
    "faiss-cpu>=1.15,<1.16",
    "fsspec>=2026.9.0",
    "duckdb>=2.0,<2.1",
    "dask>=2026.8.0,<2026.9",
    "distributed>=2026.8.0,<2026.9",
    "scikit-image>=0.26,<0.27",  # bundled real photographs for samples and tests
    "tqdm>=4.66",
    "numba>=0.68,<0.69",  # the srm descriptor's counting loops (lida_core/srm.py)
]

setup(
    name="lida",
    version="0.1.0",
    description="Attribution of AI-generated images as retrieval over low-bit fingerprints (LIDA)",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11,<3.12",
    packages=find_packages(include=["lida_cli*", "lida_core*", "pipelines*", "flows*", "schemas*"]),
    package_data={"schemas": ["*.json"]},
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # OpenCV only in tests: the `paper` fingerprint restates its bilinear resize in integers,
        # and tests/test_fingerprint.py checks that restatement against cv2 itself.
        "dev": ["pytest>=8,<10", "pytest-timeout>=2.3", "ruff>=0.8", "opencv-python-headless>=4.10,<6"],
        # object-store workspaces and inputs (fsspec's own backends, same release line as fsspec)
        "s3": ["s3fs>=2026.9.0"],
        "gcs": ["gcsfs>=2026.9.0"],
    },
    entry_points={"console_scripts": ["lida=lida_cli.cli:run"]},
)
