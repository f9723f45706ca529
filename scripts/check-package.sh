#!/bin/bash
# Checks a package built by scripts/package.sh (default: the one in target/debian): the files it
# installs, its control fields and conffile, the maintainer scripts' syntax, `systemd-analyze
# verify` of its unit, every man page rendering without a groff warning, the completion scripts
# and the default configuration passing `ferrod --check-config`. Prints what failed; exit 1.
set -euo pipefail
cd "$(dirname "$0")/.."
deb=${1:-$(ls target/debian/ferrovisor_*_amd64.deb | tail -n 1)}
for tool in dpkg-deb systemd-analyze man groff bash; do
    command -v "$tool" >/dev/null || { echo "check-package.sh: $tool is missing (scripts/setup.sh --test installs it)" >&2; exit 1; }
done
failed=0
fail() { echo "check-package.sh: $*" >&2; failed=1; }

listing=$(dpkg-deb -c "$deb" | awk '{print $6}' | sed 's|^\./|/|')
expected=(
    /usr/bin/ferro /usr/bin/ferrod
    /usr/lib/systemd/system/ferrod.service
    /etc/ferrovisor/ferrod.toml
    /usr/share/man/man1/ferro.1.gz /usr/share/man/man1/ferro-define.1.gz /usr/share/man/man1/ferro-img-create.1.gz
    /usr/share/man/man8/ferrod.8.gz
    /usr/share/bash-completion/completions/ferro
    /usr/share/zsh/vendor-completions/_ferro
    /usr/share/fish/vendor_completions.d/ferro.fish
    /usr/share/doc/ferrovisor/copyright /usr/share/doc/ferrovisor/examples/domain.toml
)
for path in "${expected[@]}"; do
    grep -qx -- "$path" <<<"$listing" || fail "$path is not in the package"
done

field() { dpkg-deb -f "$deb" "$1"; }
for dep in nftables dnsmasq-base adduser 'libc6 (>='; do
    [[ "$(field Depends)" == *"$dep"* ]] || fail "Depends lacks $dep: $(field Depends)"
done
for rec in qemu-utils iproute2; do
    [[ "$(field Recommends)" == *"$rec"* ]] || fail "Recommends lacks $rec: $(field Recommends)"
done

root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -R "$deb" "$root"
[ "$(cat "$root/DEBIAN/conffiles")" = /etc/ferrovisor/ferrod.toml ] || fail "conffiles: $(cat "$root/DEBIAN/conffiles")"
for script in postinst prerm postrm; do
    sh -n "$root/DEBIAN/$script" || fail "$script does not parse"
done
grep -q 'addgroup --quiet --system ferro$' "$root/DEBIAN/postinst" || fail "postinst does not create the ferro group"
grep -q 'adduser --quiet --system .* ferro-vmm$' "$root/DEBIAN/postinst" || fail "postinst does not create the ferro-vmm user"
(cd "$root" && md5sum --quiet -c DEBIAN/md5sums) || fail "md5sums do not match the files"

# The unit as installed, with ExecStart pointing at the packaged ferrod; its man page is found
# through the package's man directory. DelegateSubgroup= is new in systemd 254: an older
# systemd-analyze does not know it (docs/service.md says what that means on such hosts).
unit_dir=$(mktemp -d -p "$root")
sed "s|^ExecStart=/usr/bin/ferrod|ExecStart=$root/usr/bin/ferrod|" "$root/usr/lib/systemd/system/ferrod.service" >"$unit_dir/ferrod.service"
systemd_version=$(systemd-analyze --version | awk 'NR == 1 {print $2}')
verify=$(MANPATH="$root/usr/share/man" systemd-analyze verify "$unit_dir/ferrod.service" 2>&1) || fail "systemd-analyze verify failed: $verify"
if [ "$systemd_version" -lt 254 ]; then
    verify=$(grep -v "Unknown key 'DelegateSubgroup' in section \[Service\], ignoring" <<<"$verify" || true)
fi
[ -z "$verify" ] || fail "systemd-analyze verify (systemd $systemd_version) warns: $verify"

pages=0
for page in "$root"/usr/share/man/man*/*.gz; do
    warnings=$(LC_ALL=C.UTF-8 MANWIDTH=80 man --warnings=all -l "$page" 2>&1 >/dev/null)
    [ -z "$warnings" ] || fail "$(basename "$page"): $warnings"
    pages=$((pages + 1))
done
[ "$pages" -gt 10 ] || fail "only $pages man pages"

bash -n "$root/usr/share/bash-completion/completions/ferro" || fail "the bash completion does not parse"
grep -q '^#compdef ferro' "$root/usr/share/zsh/vendor-completions/_ferro" || fail "the zsh completion lacks #compdef"
grep -q -- '--command ferro ' "$root/usr/share/fish/vendor_completions.d/ferro.fish" || fail "the fish completion does not complete ferro"
grep -q 'COMPLETE=bash\|COMPLETE="bash"' "$root/usr/share/bash-completion/completions/ferro" || fail "the bash completion is not ferro's dynamic one"

check=$("$root/usr/bin/ferrod" --config "$root/etc/ferrovisor/ferrod.toml" --check-config 2>&1) || fail "the default configuration: $check"
version=$("$root/usr/bin/ferro" --version)
[[ "$version" == "ferro $(dpkg-deb -f "$deb" Version) ("* ]] || fail "ferro --version says $version"

if [ "$failed" -ne 0 ]; then
    exit 1
fi
echo "check-package.sh: $deb: $(wc -l <<<"$listing") entries, $pages man pages, unit verified (systemd $systemd_version), all checks passed" >&2
