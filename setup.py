from setuptools import setup

setup(
    name="deit-fast",
    version="0.1.0",
    description="Fast, trustworthy training of DeiT vision transformers: Triton kernels, "
    "a GPU data pipeline and a cached teacher.",
    python_requires=">=3.10",
    packages=["kernels", "deit_fast", "deit_fast.models", "data_pipeline"],
    install_requires=[
        "torch>=2.6",
        "torchvision",
        "numpy",
        "pyyaml",
        "pillow",
        "tqdm",
        "tensorboard",
        "matplotlib",
        "timm",
    ],
    extras_require={
        "dali": ["nvidia-dali-cuda130"],
        "demo": ["scikit-learn"],
        "test": ["pytest", "ruff", "scikit-learn", "scikit-image"],
    },
    entry_points={"console_scripts": ["deit-fast=deit_fast.cli:main"]},
)
