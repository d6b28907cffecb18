from setuptools import setup

setup(
    name="deit-fast",
    version="0.1.0",
    description="Fast, trustworthy training of DeiT vision transformers: Triton kernels, "
    "a GPU data pipeline and a cached teacher.",
    python_requires=">=3.10",
    # The repository's top-level kernels/, data_pipeline/ and configs/ install inside
    # deit_fast, so that no top-level `kernels` or `data_pipeline` collides with PyPI's.
    packages=["deit_fast", "deit_fast.models", "deit_fast.kernels", "deit_fast.data_pipeline",
              "deit_fast.configs"],
    package_dir={"deit_fast.kernels": "kernels", "deit_fast.data_pipeline": "data_pipeline",
                 "deit_fast.configs": "configs"},
    package_data={"deit_fast.configs": ["*.yaml"]},
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
