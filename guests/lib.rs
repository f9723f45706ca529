//! The built-in test guests: small freestanding kernels (PVH ELF) built from `kit/` and `src/`
//! by `build.rs`. They follow the kvm-pvm rules of docs/kvm-pvm.md (plain integer ring 0,
//! heavy work in ring 3), report on COM1 and end through the isa-debug-exit port or ACPI S5, so
//! the very same files also boot under QEMU (`-kernel FILE`).

include!(concat!(env!("OUT_DIR"), "/guests.rs"));

/// The image of the built-in guest `name`.
pub fn get(name: &str) -> Option<&'static [u8]> {
    GUESTS.iter().find(|(n, _)| *n == name).map(|(_, image)| *image)
}

/// The names of all built-in guests.
pub fn names() -> impl Iterator<Item = &'static str> {
    GUESTS.iter().map(|(n, _)| *n)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_guest_is_an_elf_with_a_pvh_note() {
        assert!(super::get("hello").is_some());
        for (name, image) in super::GUESTS {
            assert_eq!(&image[..4], b"\x7fELF", "{name} is not ELF");
            assert_eq!(image[4], 2, "{name} is not ELF64");
            // The note payload: name "Xen" followed by type 18 in the header before it.
            let has_note = image.windows(16).any(|w| w[4..8] == 4u32.to_le_bytes() && w[8..12] == 18u32.to_le_bytes() && &w[12..16] == b"Xen\0");
            assert!(has_note, "{name} has no XEN_ELFNOTE_PHYS32_ENTRY note");
        }
    }
}
