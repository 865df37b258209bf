from setuptools import find_packages, setup

with open("README.md", encoding="utf-8") as fh:
    long_description = fh.read()

setup(
    name="cellmnn",
    version="0.1.0",
    description="Cell-MNN (Cell-Mechanistic Neural Networks) with Triton kernels for the local-linear ODE step",
    long_description=long_description,
    long_description_content_type="text/markdown",
    packages=find_packages(include=["cellmnn", "cellmnn.*", "cellmnn_kernels", "cellmnn_kernels.*"]),
    python_requires=">=3.9",
    install_requires=["torch>=2.4", "numpy", "scikit-learn", "anndata", "pot", "tqdm", "matplotlib"],
    package_data={"cellmnn.data": ["datasets/*.csv", "datasets/*.txt", "datasets/README.md"]},
    entry_points={"console_scripts": ["cellmnn=cellmnn.cli:main"]},
    extras_require={
        "triton": ["triton>=3.0"],
        "test": ["triton>=3.0", "pytest", "pytest-xdist", "pytest-benchmark", "hypothesis"],
    },
)
