# jaxpaged on NVIDIA GPUs: `docker build -t jaxpaged:cuda .` then
# `docker run --gpus all -p 8000:8000 -v jaxpaged-cache:/cache jaxpaged:cuda MODEL [flags]`
# runs `jaxpaged serve MODEL [flags]` (docs/deployment.md). The jax[cuda12] wheels bring CUDA's
# libraries; the base image adds what the NVIDIA container toolkit expects of a CUDA image.
FROM nvidia/cuda:12.8.1-base-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH
WORKDIR /opt/jaxpaged
COPY pyproject.toml README.md ./
COPY jaxpaged ./jaxpaged
RUN pip install --no-cache-dir ".[cuda12,structured]"
# model downloads and compiled programs (and the demo model) on one volume
ENV HF_HOME=/cache/huggingface JAXPAGED_CACHE=/cache/jaxpaged
EXPOSE 8000
ENTRYPOINT ["jaxpaged", "serve"]
