#!/bin/sh
# Unpack Debian trixie-backports' Mesa 26 lavapipe -- the first Debian Mesa whose lavapipe lists
# VK_KHR_cooperative_matrix -- together with its whole runtime closure (trixie's glibc, LLVM 19,
# Vulkan loader, ...) into a private prefix on a Debian bookworm machine, leaving the system untouched.
# Mesa 26 needs glibc >= 2.39, so LD_LIBRARY_PATH alone cannot work on bookworm (glibc 2.36): programs
# run under trixie's own dynamic loader instead. Prints the environment that does so:
#
#   eval "$(sh mesa26.sh /work/mesa26)"
#   "$MESA26_LD" --library-path "$MESA26_LIBS" ./some-binary     # one program
#   cargo test --test coop ...                                   # via the printed cargo runner
#
# Idempotent: with the prefix complete, only prints the environment. Needs apt-get and dpkg-deb (any
# Debian), network access to deb.debian.org (or $MESA26_MIRROR), no root. The version is whatever
# trixie-backports carries today (deb.debian.org keeps only the current one); pin one through
# snapshot.debian.org with MESA26_MIRROR=https://snapshot.debian.org/archive/debian/<timestamp> if needed.
set -eu

PREFIX=${1:-/work/mesa26}
MIRROR=${MESA26_MIRROR:-http://deb.debian.org/debian}
ARCH=$(dpkg --print-architecture)
TRIPLET=$(dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu)
LIBDIR="$PREFIX/root/usr/lib/$TRIPLET"
ICD_FIXED="$PREFIX/lvp_icd.json"

print_env() {
    ld=$(ls "$LIBDIR"/ld-linux*.so.* | head -n 1)
    echo "export VK_DRIVER_FILES='$ICD_FIXED'"
    # The system's implicit layers (Mesa 22's device_select) would load into the Mesa 26 process.
    echo "export VK_LOADER_LAYERS_DISABLE='~implicit~'"
    echo "export MESA26_LD='$ld'"
    echo "export MESA26_LIBS='$LIBDIR'"
    runner_var=CARGO_TARGET_$(rustc -vV 2>/dev/null | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')_RUNNER
    [ "$runner_var" = CARGO_TARGET__RUNNER ] && runner_var=CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUNNER
    echo "export $runner_var='$ld --library-path $LIBDIR'"
}

if [ -f "$PREFIX/.complete" ] && [ -f "$ICD_FIXED" ]; then
    print_env
    exit 0
fi

APT="$PREFIX/apt"
rm -rf "$APT" "$PREFIX/root"
mkdir -p "$APT/lists/partial" "$APT/cache/archives/partial" "$APT/preferences.d" "$PREFIX/root"
cat >"$APT/sources.list" <<EOF
deb $MIRROR trixie main
deb $MIRROR trixie-backports main
EOF
# An empty dpkg status makes apt resolve the complete closure, glibc included.
: >"$APT/status"
set -- -o Dir::Etc::sourcelist="$APT/sources.list" -o Dir::Etc::sourceparts=- \
    -o Dir::Etc::preferences="$APT/preferences" -o Dir::Etc::preferencesparts="$APT/preferences.d" \
    -o Dir::State="$APT" -o Dir::State::lists="$APT/lists" -o Dir::State::status="$APT/status" \
    -o Dir::Cache="$APT/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User="$(id -un)" \
    -o APT::Architecture="$ARCH" -o APT::Architectures="$ARCH" -o APT::Install-Recommends=0 \
    -o APT::Get::List-Cleanup=0
apt-get -q "$@" update >&2
apt-get -q -y "$@" -t trixie-backports install --download-only mesa-vulkan-drivers libvulkan1 vulkan-tools >&2

for deb in "$APT"/cache/archives/*.deb; do
    dpkg-deb -x "$deb" "$PREFIX/root"
done

ICD=$(ls "$PREFIX"/root/usr/share/vulkan/icd.d/lvp_icd*.json 2>/dev/null | head -n 1)
if [ -z "$ICD" ]; then
    echo "mesa26.sh: no lvp_icd*.json after unpacking" >&2
    exit 1
fi
sed "s#\"library_path\": *\"[^\"]*\"#\"library_path\": \"$LIBDIR/libvulkan_lvp.so\"#" "$ICD" >"$ICD_FIXED"

ld=$(ls "$LIBDIR"/ld-linux*.so.* | head -n 1)
missing=$("$ld" --library-path "$LIBDIR" --list "$LIBDIR/libvulkan_lvp.so" | grep 'not found' || true)
if [ -n "$missing" ]; then
    echo "mesa26.sh: libvulkan_lvp.so lacks: $missing" >&2
    exit 1
fi
# Smoke test: the driver loads and lists cooperative matrices.
if ! VK_DRIVER_FILES="$ICD_FIXED" VK_LOADER_LAYERS_DISABLE='~implicit~' \
    "$ld" --library-path "$LIBDIR" "$PREFIX/root/usr/bin/vulkaninfo" 2>/dev/null |
    grep -q VK_KHR_cooperative_matrix; then
    echo "mesa26.sh: vulkaninfo under $ICD_FIXED does not list VK_KHR_cooperative_matrix" >&2
    exit 1
fi

dpkg-deb -f "$APT"/cache/archives/mesa-vulkan-drivers_*.deb Version >"$PREFIX/.complete"
print_env
