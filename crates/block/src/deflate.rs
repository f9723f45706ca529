//! Deflate for compressed image data: qcow2's compressed clusters (raw deflate) and VMDK's
//! compressed grains (zlib framing). zlib-rs through flate2, as fast as the C zlib qemu-img uses.

/// How a compressed block is framed.
#[derive(Clone, Copy)]
pub enum Framing {
    /// Bare deflate (qcow2).
    Raw,
    /// A zlib header and checksum around the deflate stream (VMDK).
    Zlib,
}

/// Inflates `input` into at most `limit` bytes. Like QEMU, a stream that ends, or one that fills
/// exactly `limit` bytes, is accepted (bytes after the stream are padding); anything else is an
/// error naming what went wrong.
pub fn inflate(input: &[u8], limit: usize, framing: Framing) -> Result<Vec<u8>, String> {
    let mut out = Vec::with_capacity(limit);
    let mut z = flate2::Decompress::new(matches!(framing, Framing::Zlib));
    match z.decompress_vec(input, &mut out, flate2::FlushDecompress::Finish) {
        Ok(flate2::Status::StreamEnd) => Ok(out),
        Ok(_) if out.len() == limit => Ok(out),
        Ok(_) => Err(format!("the stream ends early, after {} of at most {limit} bytes", out.len())),
        Err(e) => Err(e.to_string()),
    }
}

/// `data` as one zlib stream at compression `level` (0-9).
pub fn zlib(data: &[u8], level: u32) -> Vec<u8> {
    // Incompressible data grows by 5 bytes per 64 KiB stored block, plus the framing: one pass
    // is enough, and the loop only guards that bound.
    let mut out = Vec::with_capacity(data.len() + data.len() / 1024 + 64);
    let mut z = flate2::Compress::new(flate2::Compression::new(level), true);
    loop {
        let consumed = z.total_in() as usize;
        match z.compress_vec(&data[consumed..], &mut out, flate2::FlushCompress::Finish) {
            Ok(flate2::Status::StreamEnd) => return out,
            Ok(_) => out.reserve(out.capacity().max(4096)),
            // Only a misuse of the stream (a flush out of order) fails; the data never makes it fail.
            Err(e) => panic!("zlib compression into memory failed: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_refuses_short_or_long_streams() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 / 13) as u8).collect();
        let packed = zlib(&data, 6);
        assert!(packed.len() < data.len() / 4);
        assert_eq!(inflate(&packed, data.len(), Framing::Zlib).unwrap(), data);
        // Padding after the stream is ignored; a cut stream is not.
        let mut padded = packed.clone();
        padded.extend_from_slice(&[0u8; 300]);
        assert_eq!(inflate(&padded, data.len(), Framing::Zlib).unwrap(), data);
        assert!(inflate(&packed[..packed.len() / 2], data.len(), Framing::Zlib).is_err());
        // More output than the limit: only the limit is produced, which is accepted as QEMU does.
        assert_eq!(inflate(&packed, 4096, Framing::Zlib).unwrap(), &data[..4096]);
        // Incompressible data fits the output buffer.
        let noise: Vec<u8> = (0..65536u64).map(|i| (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8).collect();
        assert_eq!(inflate(&zlib(&noise, 6), noise.len(), Framing::Zlib).unwrap(), noise);
        assert!(inflate(b"not deflate at all", 100, Framing::Raw).is_err());
    }
}
