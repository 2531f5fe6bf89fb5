# lowprec on a CUDA GPU.
#   docker build -t lowprec .
#   docker run --gpus all --rm -e WANDB_API_KEY -v /path/to/datasets:/data -v $PWD/outputs:/workspace/lowprec/outputs \
#       lowprec python scripts/reproduce.py luq_table --scale full
# Datasets are read from /data (ImageNet at /data/imagenet/{train,val}, CIFAR-10 at
# /data/cifar10/cifar-10-batches-py; the full-scale experiment files point there). Nothing is
# downloaded at run time. WANDB_API_KEY comes from the environment of `docker run` (never baked in);
# without it W&B runs offline under each run directory.
FROM pytorch/pytorch:2.5.1-cuda12.4-cudnn9-runtime

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1

# A C compiler: Triton compiles its launcher stubs with one at run time, and lowprec.kernels.native
# builds the CPU estimators' C twins with it (without one both fall back or fail: the CPU path runs
# the slower torch cores). libc6-dev brings the headers, gcc's libgomp the OpenMP runtime.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /workspace/lowprec
COPY . .
# torch (2.5.1, CUDA 12.4) and torchvision come with the base image and satisfy pyproject's pins,
# so pip adds only the rest (timm, hydra-core, submitit launcher, wandb, ...).
RUN pip install -e . && python -c "import lowprec, hydra, timm, wandb" \
    && LOWPREC_CACHE_DIR=/tmp/lowprec-build python -c \
       "from lowprec.kernels import native; assert native.library() is not None, native.status()" \
    && rm -rf /tmp/lowprec-build

VOLUME ["/data"]
CMD ["python", "run.py"]
