# Sourced by the tools/device scripts on the lent GPU machine: the Vulkan loader (and with `dev`, its
# headers and glslc for llama.cpp's Vulkan backend) from .gl, the wheels from .whl, vkpack importable.
#     . tools/device/setup.sh [dev]
export PYTHONUNBUFFERED=1
for f in .gl/*.deb; do dpkg -x "$f" /; done
[ "${1:-}" = dev ] && for f in .gl/dev/*.deb; do dpkg -x "$f" /; done
ldconfig
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || return 1
ln -sfn "$PWD" /tmp/vkpack
export PYTHONPATH=/tmp:/tmp/site VKPACK_CACHE=/tmp/vkc
