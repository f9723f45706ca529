//! What a disk's boot loader would boot, from its configuration text: Boot Loader Specification
//! entries (`/boot/loader/entries/*.conf`, Fedora, RHEL, systemd-boot) and GRUB's generated
//! `grub.cfg` (Debian, Ubuntu). Only the parts that name a kernel are understood: menu entries,
//! submenus, `set default=`, and the `linux`/`initrd` lines inside an entry. Paths are returned as
//! the configuration writes them; [`crate::boot`] resolves them on the filesystem.

/// A kernel to boot as the configuration names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub title: String,
    pub kernel: String,
    /// Several initrds are loaded one after the other (concatenated cpio archives).
    pub initrds: Vec<String>,
    pub cmdline: String,
}

/// Reads `key value` lines of a BLS entry. `vars` resolves `$name` references in `options` (the
/// `kernelopts` of grubenv on older Fedora). None when the entry names no kernel.
pub fn parse_bls(text: &str, vars: &dyn Fn(&str) -> Option<String>) -> Result<Option<(String, Entry)>, String> {
    let mut entry = Entry { title: String::new(), kernel: String::new(), initrds: Vec::new(), cmdline: String::new() };
    let mut version = String::new();
    let mut options = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (key, value) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        let value = value.trim();
        match key {
            "title" => entry.title = value.to_string(),
            "version" => version = value.to_string(),
            "linux" => entry.kernel = value.to_string(),
            "initrd" => entry.initrds.extend(value.split_whitespace().map(str::to_string)),
            "options" => options.push(value.to_string()),
            _ => {}
        }
    }
    if entry.kernel.is_empty() {
        return Ok(None);
    }
    let mut words = Vec::new();
    for word in options.iter().flat_map(|o| o.split_whitespace()) {
        match word.strip_prefix('$') {
            Some(name) => {
                let value = vars(name).ok_or_else(|| format!("options refers to ${name}, which grubenv does not set"))?;
                words.extend(value.split_whitespace().map(str::to_string));
            }
            None => words.push(word.to_string()),
        }
    }
    entry.cmdline = words.join(" ");
    Ok(Some((version, entry)))
}

/// Orders BLS versions the way boot menus list them: newest first, numbers compared as numbers.
pub fn newest_first(a: &str, b: &str) -> std::cmp::Ordering {
    version_cmp(b, a)
}

fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    let (mut x, mut y) = (a.as_bytes(), b.as_bytes());
    loop {
        match (x.first(), y.first()) {
            (None, None) => return std::cmp::Ordering::Equal,
            (None, Some(_)) => return std::cmp::Ordering::Less,
            (Some(_), None) => return std::cmp::Ordering::Greater,
            (Some(p), Some(q)) if p.is_ascii_digit() && q.is_ascii_digit() => {
                let n = x.iter().take_while(|c| c.is_ascii_digit()).count();
                let m = y.iter().take_while(|c| c.is_ascii_digit()).count();
                let (dx, dy) = (trim_zeros(&x[..n]), trim_zeros(&y[..m]));
                let order = dx.len().cmp(&dy.len()).then(dx.cmp(dy));
                if order.is_ne() {
                    return order;
                }
                (x, y) = (&x[n..], &y[m..]);
            }
            (Some(p), Some(q)) => {
                if p != q {
                    return p.cmp(q);
                }
                (x, y) = (&x[1..], &y[1..]);
            }
        }
    }
}

fn trim_zeros(digits: &[u8]) -> &[u8] {
    let zeros = digits.iter().take_while(|&&c| c == b'0').count();
    &digits[zeros.min(digits.len().saturating_sub(1))..]
}

/// One item of a GRUB menu.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Item {
    Entry { id: String, entry: Entry },
    Submenu { title: String, id: String, items: Vec<Item> },
}

/// Splits a GRUB command line into words, honouring '…' and "…" quoting and backslashes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = line.chars();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some('"'), '\\') => cur.extend(chars.next()),
            (Some(_), c) => cur.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, '\\') => {
                cur.extend(chars.next());
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            (None, '#') if !in_word => break,
            (None, c) => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        out.push(cur);
    }
    out
}

/// The `--id` of a menu entry (`--id X` or `$menuentry_id_option 'X'`).
fn entry_id(args: &[String]) -> String {
    args.windows(2).find(|w| w[0] == "--id" || w[0] == "$menuentry_id_option").map(|w| w[1].clone()).unwrap_or_default()
}

/// Drops a GRUB device prefix such as `($root)` or `(hd0,gpt2)` from a path.
fn strip_device(path: &str) -> String {
    match path.strip_prefix('(').and_then(|p| p.split_once(')')) {
        Some((_, rest)) => rest.to_string(),
        None => path.to_string(),
    }
}

/// Deepest submenu nesting followed.
const MAX_DEPTH: usize = 8;

/// Parses the menu of a grub.cfg. Returns the items and every literal `set default=` value.
fn parse_menu(text: &str) -> Result<(Vec<Item>, Vec<String>), String> {
    let mut stack: Vec<(String, String, Vec<Item>)> = vec![(String::new(), String::new(), Vec::new())];
    let mut current: Option<(String, Entry)> = None;
    // For the root, each open submenu and the open entry: how many non-menu blocks (if, function,
    // for, while) are open inside it, so that their closing '}' or 'fi' is not taken for its end.
    let mut blocks: Vec<usize> = vec![0];
    let mut defaults = Vec::new();
    for raw in text.lines() {
        let w = words(raw.trim());
        let Some(first) = w.first() else { continue };
        let open_blocks = blocks.last().copied().unwrap_or(0);
        match first.as_str() {
            "menuentry" | "submenu" if raw.trim_end().ends_with('{') => {
                if current.is_some() {
                    return Err("a menuentry opens inside another menuentry".to_string());
                }
                if blocks.len() > MAX_DEPTH {
                    return Err(format!("menus nested deeper than {MAX_DEPTH}"));
                }
                let title = w.get(1).cloned().unwrap_or_default();
                if first == "menuentry" {
                    let entry = Entry { title, kernel: String::new(), initrds: Vec::new(), cmdline: String::new() };
                    current = Some((entry_id(&w), entry));
                } else {
                    stack.push((title, entry_id(&w), Vec::new()));
                }
                blocks.push(0);
            }
            "}" if open_blocks == 0 => {
                if let Some((id, entry)) = current.take() {
                    blocks.pop();
                    if let Some(level) = stack.last_mut() {
                        level.2.push(Item::Entry { id, entry });
                    }
                } else if stack.len() > 1 {
                    blocks.pop();
                    if let Some((title, id, items)) = stack.pop()
                        && let Some(level) = stack.last_mut()
                    {
                        level.2.push(Item::Submenu { title, id, items });
                    }
                }
            }
            "}" | "fi" | "done" => {
                if let Some(n) = blocks.last_mut() {
                    *n = n.saturating_sub(1);
                }
            }
            "if" | "function" | "for" | "while" => {
                if let Some(n) = blocks.last_mut() {
                    *n += 1;
                }
            }
            "set" if current.is_none() => {
                if let Some(value) = w.get(1).and_then(|a| a.strip_prefix("default=")) {
                    if !value.contains('$') {
                        defaults.push(value.to_string());
                    }
                }
            }
            "linux" | "linux16" | "linuxefi" => {
                if let Some((_, entry)) = current.as_mut() {
                    entry.kernel = strip_device(w.get(1).map_or("", String::as_str));
                    entry.cmdline = w[2.min(w.len())..].iter().filter(|a| !a.contains('$')).cloned().collect::<Vec<_>>().join(" ");
                }
            }
            "initrd" | "initrd16" | "initrdefi" => {
                if let Some((_, entry)) = current.as_mut() {
                    entry.initrds = w[1..].iter().map(|p| strip_device(p)).collect();
                }
            }
            _ => {}
        }
    }
    let items = stack.into_iter().next().map(|level| level.2).unwrap_or_default();
    Ok((items, defaults))
}

/// The entry a grub.cfg boots by default: its last literal `set default=` (a number, "N>M" into
/// submenus, a title or an id; `saved` takes `saved_entry` from grubenv through `saved`), else the
/// first entry. None when the menu names no kernel.
pub fn grub_default(text: &str, saved: Option<&str>) -> Result<Option<Entry>, String> {
    let (items, defaults) = parse_menu(text)?;
    let mut choice = defaults.last().cloned().unwrap_or_else(|| "0".to_string());
    if choice == "saved" {
        choice = saved.unwrap_or("0").to_string();
    }
    let mut level: &[Item] = &items;
    let mut found = None;
    for part in choice.split('>') {
        let item = match part.parse::<usize>() {
            Ok(i) => level.get(i),
            Err(_) => level.iter().find(|it| match it {
                Item::Entry { id, entry } => *id == part || entry.title == part,
                Item::Submenu { title, id, .. } => *id == part || *title == part,
            }),
        };
        match item {
            Some(Item::Entry { entry, .. }) => {
                found = Some(entry.clone());
                break;
            }
            Some(Item::Submenu { items, .. }) => level = items,
            None => break,
        }
    }
    // A default that names nothing falls back to the first entry, as GRUB does.
    let found = found.or_else(|| first_entry(&items));
    Ok(found.filter(|e| !e.kernel.is_empty()))
}

fn first_entry(items: &[Item]) -> Option<Entry> {
    items.iter().find_map(|it| match it {
        Item::Entry { entry, .. } => Some(entry.clone()),
        Item::Submenu { items, .. } => first_entry(items),
    })
}

/// `key=value` lines of a GRUB environment block (`grubenv`).
pub fn grubenv(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('='))).map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shape of Debian 12's generated grub.cfg, shortened.
    const DEBIAN: &str = r#"
if [ -s $prefix/grubenv ]; then
  load_env
fi
if [ "${next_entry}" ] ; then
   set default="${next_entry}"
   set next_entry=
else
   set default="0"
fi
function load_video {
  if [ x$feature_all_video_module = xy ]; then
    insmod all_video
  fi
}
menuentry 'Debian GNU/Linux' --class debian $menuentry_id_option 'gnulinux-simple-1234' {
	load_video
	insmod ext2
	if [ x$feature_platform_search_hint = xy ]; then
	  search --no-floppy --fs-uuid --set=root 1234
	fi
	echo	'Loading Linux 6.1.0-18-amd64 ...'
	linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro  quiet $vt_handoff
	initrd	/boot/initrd.img-6.1.0-18-amd64
}
submenu 'Advanced options for Debian GNU/Linux' $menuentry_id_option 'gnulinux-advanced-1234' {
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-18-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-18-amd64-advanced-1234' {
		linux	/boot/vmlinuz-6.1.0-18-amd64 root=UUID=1234 ro  quiet
		initrd	/boot/initrd.img-6.1.0-18-amd64
	}
	menuentry 'Debian GNU/Linux, with Linux 6.1.0-17-amd64' --class debian $menuentry_id_option 'gnulinux-6.1.0-17-amd64-advanced-1234' {
		linux	(hd0,gpt1)/boot/vmlinuz-6.1.0-17-amd64 root=UUID=1234 ro single
		initrd	/boot/intel-ucode.img /boot/initrd.img-6.1.0-17-amd64
	}
}
"#;

    #[test]
    fn grub_default_entry_and_submenus() {
        let e = grub_default(DEBIAN, None).unwrap().unwrap();
        assert_eq!(e.title, "Debian GNU/Linux");
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1.0-18-amd64");
        assert_eq!(e.initrds, ["/boot/initrd.img-6.1.0-18-amd64"]);
        assert_eq!(e.cmdline, "root=UUID=1234 ro quiet");
        let older = DEBIAN.replace("set default=\"0\"", "set default=\"1>1\"");
        let e = grub_default(&older, None).unwrap().unwrap();
        assert_eq!(e.kernel, "/boot/vmlinuz-6.1.0-17-amd64");
        assert_eq!(e.initrds, ["/boot/intel-ucode.img", "/boot/initrd.img-6.1.0-17-amd64"]);
        let by_id = DEBIAN.replace("set default=\"0\"", "set default=saved");
        let e = grub_default(&by_id, Some("gnulinux-advanced-1234>gnulinux-6.1.0-17-amd64-advanced-1234")).unwrap().unwrap();
        assert_eq!(e.cmdline, "root=UUID=1234 ro single");
        let missing = DEBIAN.replace("set default=\"0\"", "set default=\"7\"");
        assert_eq!(grub_default(&missing, None).unwrap().unwrap().title, "Debian GNU/Linux");
        assert_eq!(grub_default("set default=0\n", None).unwrap(), None);
        assert!(grub_default("menuentry 'a' {\nmenuentry 'b' {\n}\n}\n", None).is_err());
        let deep = "submenu 'x' {\n".repeat(20);
        let efi = "if [ x = y ]; then\nmenuentry 'fw' {\nfwsetup\n}\nfi\nmenuentry 'b' {\nlinux /k\n}\n";
        assert_eq!(grub_default(&efi.replace("'fw' {\nfwsetup", "'fw' {\nlinux /fw"), None).unwrap().unwrap().kernel, "/fw");
        assert_eq!(grub_default(&format!("set default=1\n{efi}"), None).unwrap().unwrap().kernel, "/k");
        assert!(grub_default(&deep, None).is_err());
    }

    #[test]
    fn bls_entries_and_versions() {
        let text = "title Fedora Linux (6.5.6-300.fc39.x86_64)\nversion 6.5.6-300.fc39.x86_64\nlinux /vmlinuz-6.5.6-300.fc39.x86_64\n\
                    initrd /initramfs-6.5.6-300.fc39.x86_64.img\noptions root=UUID=abcd ro $extra rhgb\n";
        let vars = |name: &str| (name == "extra").then(|| "quiet  console=tty0".to_string());
        let (version, e) = parse_bls(text, &vars).unwrap().unwrap();
        assert_eq!(version, "6.5.6-300.fc39.x86_64");
        assert_eq!(e.kernel, "/vmlinuz-6.5.6-300.fc39.x86_64");
        assert_eq!(e.cmdline, "root=UUID=abcd ro quiet console=tty0 rhgb");
        assert!(parse_bls(text, &|_| None).unwrap_err().contains("$extra"));
        assert_eq!(parse_bls("title nothing\n", &|_| None).unwrap(), None);
        let mut versions = vec!["6.5.6-300.fc39", "6.10.1-100.fc39", "6.5.12-300.fc39", "0-rescue-1234"];
        versions.sort_by(|a, b| newest_first(a, b));
        assert_eq!(versions, ["6.10.1-100.fc39", "6.5.12-300.fc39", "6.5.6-300.fc39", "0-rescue-1234"]);
    }

    #[test]
    fn words_and_grubenv() {
        assert_eq!(words(r#"menuentry 'a b' "c\"d" e\ f # comment"#), ["menuentry", "a b", "c\"d", "e f"]);
        assert_eq!(grubenv("# GRUB Environment Block\nsaved_entry=1>2\n#####", "saved_entry").as_deref(), Some("1>2"));
    }
}
