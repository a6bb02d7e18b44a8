# igpt-batch images: Ray's own image of the locked Ray, plus the locked torch and this project from constraints.txt.
# Two targets (docs/INSTALL.md, "Images"):
#   gpu  workers: PyPI's torch wheel, the CUDA 13.0 build (driver >= 580)
#   cpu  heads:   Ray's CPU image and PyTorch's CPU wheel of the same torch (no GB of CUDA libraries)
#
#   docker build --target gpu -t my-registry.example.com/igpt-batch:0.1.0-gpu .
#   docker build --target cpu -t my-registry.example.com/igpt-batch:0.1.0-cpu .
#
# deploy/k8s and cluster.yaml name exactly these two tags; tests/test_deploy.py checks that, and that the FROM
# tags are constraints.txt's ray (2.60.0, py311 = the Python the lock was made for).

FROM rayproject/ray:2.60.0-py311 AS cpu
WORKDIR /home/ray/igpt-batch
COPY --chown=ray:users constraints.txt pyproject.toml README.md ./
# CPU torch first, without its dependencies: the project install below keeps it and adds the rest from the lock
RUN pip install --no-cache-dir --no-deps --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"
COPY --chown=ray:users igpt_batch ./igpt_batch
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -c constraints.txt . \
 && python -c "import igpt_batch, ray, torch; assert ray.__version__ == '2.60.0' and not torch.version.cuda, torch.__version__"

FROM rayproject/ray:2.60.0-py311-gpu AS gpu
WORKDIR /home/ray/igpt-batch
COPY --chown=ray:users constraints.txt pyproject.toml README.md ./
# the locked torch alone first: its layer of CUDA wheels is reused when only the project changes
RUN pip install --no-cache-dir -c constraints.txt "torch==2.13.0"
COPY --chown=ray:users igpt_batch ./igpt_batch
COPY --chown=ray:users jobs ./jobs
COPY --chown=ray:users configs ./configs
RUN pip install --no-cache-dir -c constraints.txt . \
 && python -c "import igpt_batch, ray, torch; assert ray.__version__ == '2.60.0' and torch.version.cuda, torch.__version__"
