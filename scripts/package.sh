#!/bin/bash
# Builds the Debian package target/debian/ferrovisor_<version>_amd64.deb from this checkout with
# dpkg-deb (no debhelper): ferro and ferrod, the systemd unit, man pages and shell completions
# generated from the binaries' clap definitions, the commented default /etc/ferrovisor/ferrod.toml
# (a conffile) and the maintainer scripts of packaging/debian/. docs/service.md describes it.
#
#   scripts/package.sh            the release build
#   scripts/package.sh --debug    the debug build, stripped (quick: what CI checks)
#
# $CARGO is the cargo command to build with (default: cargo).
set -euo pipefail
cd "$(dirname "$0")/.."
profile=release
build=(--release)
compress=(-Zxz)
if [ "${1:-}" = "--debug" ]; then
    profile=debug
    build=()
    compress=(-Zgzip -z1)
fi
for tool in dpkg-deb dpkg-shlibdeps strip gzip; do
    command -v "$tool" >/dev/null || { echo "package.sh: $tool is missing (scripts/setup.sh installs it)" >&2; exit 1; }
done
${CARGO:-cargo} build "${build[@]}" -p ferro-cli -p ferro-manager >&2

version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n 1)
out=target/debian
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage/DEBIAN"
install -D -m 0755 -t "$stage/usr/bin" "target/$profile/ferro" "target/$profile/ferrod"
strip --strip-debug "$stage/usr/bin/ferro" "$stage/usr/bin/ferrod"
install -D -m 0644 packaging/ferrod.service "$stage/usr/lib/systemd/system/ferrod.service"
install -D -m 0644 packaging/ferrod.toml "$stage/etc/ferrovisor/ferrod.toml"
install -D -m 0644 examples/domain.toml "$stage/usr/share/doc/ferrovisor/examples/domain.toml"
install -D -m 0644 packaging/debian/copyright "$stage/usr/share/doc/ferrovisor/copyright"

# Man pages and completions, from the binaries just built.
pages=$(mktemp -d)
trap 'rm -rf "$pages"' EXIT
"$stage/usr/bin/ferro" man "$pages"
"$stage/usr/bin/ferrod" man "$pages"
for page in "$pages"/*; do
    section=${page##*.}
    install -D -m 0644 "$page" "$stage/usr/share/man/man$section/$(basename "$page")"
    gzip -9n "$stage/usr/share/man/man$section/$(basename "$page")"
done
completions=(
    "bash usr/share/bash-completion/completions/ferro"
    "zsh usr/share/zsh/vendor-completions/_ferro"
    "fish usr/share/fish/vendor_completions.d/ferro.fish"
)
for entry in "${completions[@]}"; do
    read -r shell path <<<"$entry"
    mkdir -p "$(dirname "$stage/$path")"
    "$stage/usr/bin/ferro" completions "$shell" >"$stage/$path"
    chmod 0644 "$stage/$path"
done

# The control file: shared-library dependencies as dpkg-shlibdeps finds them, the size in KiB.
shlibs_dir=$(mktemp -d)
mkdir -p "$shlibs_dir/debian"
printf 'Source: ferrovisor\n\nPackage: ferrovisor\nArchitecture: amd64\n' >"$shlibs_dir/debian/control"
shlibs=$(cd "$shlibs_dir" && dpkg-shlibdeps -O "$OLDPWD/$stage/usr/bin/ferro" "$OLDPWD/$stage/usr/bin/ferrod" 2>/dev/null | sed -n 's/^shlibs:Depends=//p')
rm -rf "$shlibs_dir"
[ -n "$shlibs" ] || { echo "package.sh: dpkg-shlibdeps found no library dependencies" >&2; exit 1; }
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@SIZE@/$size/" -e "s/@SHLIBS@/$shlibs/" packaging/debian/control >"$stage/DEBIAN/control"
echo /etc/ferrovisor/ferrod.toml >"$stage/DEBIAN/conffiles"
install -m 0755 -t "$stage/DEBIAN" packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm
(cd "$stage" && find . -type f ! -path './DEBIAN/*' -printf '%P\0' | sort -z | xargs -0 md5sum) >"$stage/DEBIAN/md5sums"

deb="$out/ferrovisor_${version}_amd64.deb"
dpkg-deb --root-owner-group "${compress[@]}" --build "$stage" "$deb" >&2
rm -rf "$stage"
echo "$deb"
