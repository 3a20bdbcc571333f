from setuptools import find_packages, setup

setup(
    name="megatron-eps",
    version="0.1.0",
    description="EPS-MoE expert pipeline scheduler for Megatron-Core MoE prefill inference",
    long_description=open("README.md").read() if __import__("os").path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    license_files=["LICENSE"],
    # The model configs ship inside the package (megatron_eps/configs/*.yaml, from configs/), so
    # an installed megatron-eps-prefill / megatron-eps-calibrate finds them by name.
    packages=find_packages(include=["megatron_eps", "megatron_eps.*"]) + ["megatron_eps.configs"],
    package_dir={"megatron_eps.configs": "configs"},
    package_data={"megatron_eps": ["profiles/*.json"], "megatron_eps.configs": ["*.yaml"]},
    python_requires=">=3.10",
    install_requires=[
        "megatron-core>=0.16,<0.21",
        "torch>=2.6",
        "pyyaml>=6",
        "numpy",
        "packaging",
        "tqdm",
    ],
    extras_require={
        # build: the test that builds the wheel and checks what it ships; six, regex, pydantic,
        # psutil, pybind11: Megatron-LM's megatron.training, run by the tests against its
        # unmodified snapshot (psutil: without it torch_dist saves hang); transformers (with
        # tokenizers): Megatron's HuggingFaceTokenizer, which reads the tokenizer that
        # scripts/write_number_tokenizer.py writes for the Megatron-LM generation benchmark
        "test": ["pytest>=8", "numpy<2.3", "triton>=3.3; platform_system=='Linux'", "build>=1",
                 "six", "regex", "pydantic", "psutil", "pybind11", "transformers"],
        "triton": ["triton>=3.3"],
        "te": ["transformer_engine[pytorch]"],
        # the copy-engine transport (transport: copy_engine / auto on one NVLink node)
        "copy-engine": ["cuda-bindings>=12.8"],
    },
    entry_points={
        "console_scripts": [
            "megatron-eps-calibrate=megatron_eps.calibrate.cli:main",
            "megatron-eps-prefill=megatron_eps.inference.prefill:main",
        ]
    },
)
