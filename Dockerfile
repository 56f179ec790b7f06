# EASY-EP expert masking and pruning on SGLang's official CUDA image.
#
#   docker build -t easyep-sglang .
#   docker run --gpus all --ipc=host -p 30000:30000 -v /models:/models easyep-sglang \
#       --model-path /models/DeepSeek-R1 --mask /models/r1-math-128.json --tp 8 --host 0.0.0.0 --port 30000
#
# The base image is pinned to the SGLang release the plugin is tested with (pyproject.toml: sglang==0.5.23;
# tests/test_dockerfile.py keeps the two in step). lmsysorg tags releases vX.Y.Z and vX.Y.Z-cu130 (CUDA 13);
# v0.5.19-cu129 was the last CUDA 12 tag. Not built here (no Docker on the development machine).
FROM lmsysorg/sglang:v0.5.23-cu130

ENV PIP_BREAK_SYSTEM_PACKAGES=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/easyep-sglang
COPY pyproject.toml README.md ./
COPY easyep_sglang ./easyep_sglang
COPY bench ./bench
COPY launch ./launch
# The image's sglang, torch and flashinfer satisfy the pins, so pip keeps its CUDA builds and adds only what
# is missing. The check fails the build if the base image and the pin ever disagree.
RUN python3 -m pip install . \
 && python3 -c "import sglang, easyep_sglang.launch; assert sglang.__version__ == '0.5.23', sglang.__version__"

EXPOSE 30000
ENTRYPOINT ["python3", "-m", "easyep_sglang.launch"]
CMD ["--help"]
