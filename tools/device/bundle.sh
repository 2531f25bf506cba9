#!/usr/bin/env bash
# Prepare what a lent GPU machine (Python 3.12, no network) needs to run vkpack's GPU benchmarks, in
# ignored folders of the repo root that the device tool carries: .whl (wheels of the packages its image
# lacks), .gl (the Vulkan loader) and .bench (llama.cpp's sources as llama-cpp-python vendors them,
# trimmed to what a CPU build of llama-bench needs). Run once per session from the repo root:
#     bash tools/device/bundle.sh
# then call the device tool with carry [".gl", ".whl", ".bench"] and `bash tools/device/hybrid.sh`.
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
mkdir -p .git/info
for d in /.gl/ /.whl/ /.bench/; do grep -qx "$d" .git/info/exclude 2>/dev/null || echo "$d" >> .git/info/exclude; done
mkdir -p .whl .gl .bench
plat="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64"
rm -f .whl/*.whl   # one version of each package: two stop the install there
for pkg in gguf blosc2 ndindex zfpy vulkan cffi pycparser pydantic pydantic-core annotated-types typing-inspection \
           pytest pluggy iniconfig packaging; do
  # the version installed here (the one the tests ran with), else the newest
  ver=$(python3 -c "import importlib.metadata as m, sys; print('==' + m.version(sys.argv[1]))" "$pkg" 2>/dev/null || true)
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $plat -d .whl "$pkg$ver"
done
apt_opts="-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64"
mkdir -p /tmp/amd64/partial
apt-get $apt_opts update >/dev/null
(cd .gl && apt-get $apt_opts download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2)   # the NVIDIA ICD needs libglvnd
mkdir -p .gl/dev   # for building llama.cpp's Vulkan backend there (tools/device/gpu_kernels.sh): headers, glslc
rm -f .gl/dev/*.deb
(cd .gl/dev && apt-get $apt_opts download glslc libshaderc1)
# llama.cpp's Vulkan backend needs headers newer than bookworm's 1.3.239 (VK_EXT_layer_settings): trixie's
# (headers only; the loader stays bookworm's libvulkan1)
mkdir -p /tmp/trixie/partial
mirror=$(awk '/^URIs:/ {u = $2} /^Suites:/ && / bookworm( |$)/ {print u; exit}' /etc/apt/sources.list.d/*.sources)
echo "deb $mirror trixie main" > /tmp/trixie.list   # the machine's own Debian mirror, the next release
trixie_opts="$apt_opts -oDir::State::Lists=/tmp/trixie -oDir::Etc::SourceList=/tmp/trixie.list -oDir::Etc::SourceParts=/dev/null"
apt-get $trixie_opts update >/dev/null
(cd .gl/dev && apt-get $trixie_opts download libvulkan-dev spirv-headers)
if [ ! -f .bench/llamacpp.tar.xz ]; then
  tmp=$(mktemp -d)
  python3 -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==${LLAMA_CPP_PYTHON:-0.3.36}" -d "$tmp"
  tar xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  tar cJf .bench/llamacpp.tar.xz -C "$tmp"/llama_cpp_python-*/vendor \
    --exclude='llama.cpp/models' --exclude='llama.cpp/docs' --exclude='llama.cpp/benches' \
    --exclude='llama.cpp/tools/server/webui' --exclude='llama.cpp/ggml/src/ggml-hexagon' \
    --exclude='llama.cpp/ggml/src/ggml-sycl' --exclude='llama.cpp/ggml/src/ggml-opencl' \
    --exclude='llama.cpp/ggml/src/ggml-metal' --exclude='llama.cpp/.git*' llama.cpp
  rm -rf "$tmp"
fi
du -sh .whl .gl .bench
