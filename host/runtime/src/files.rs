//! Reading the files a user names (task components, job settings) with a bound: a path that
//! names a FIFO, a device or a directory, or a file larger than the bound, is refused with an
//! error that says so, rather than blocking forever or reading without end.

use std::io::{self, Read};
use std::path::Path;

/// The largest task component read (a Python or JavaScript component is about 20 MB).
pub const MAX_COMPONENT_BYTES: u64 = 256 << 20;

/// Reads the regular file `path`, at most `max` bytes.
///
/// # Errors
/// What the file system says, or an [`io::ErrorKind::InvalidInput`] error when `path` is not a
/// regular file (after following symbolic links) or holds more than `max` bytes.
pub fn read_regular_file(path: &Path, max: u64) -> io::Result<Vec<u8>> {
    let mut options = std::fs::OpenOptions::new();
    options.read(true);
    // Opening a FIFO for reading would wait for a writer: open without waiting, then refuse it.
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.custom_flags(libc::O_NONBLOCK);
    }
    let file = options.open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it is {}, not a regular file", kind(&meta)),
        ));
    }
    let too_large = || {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("it holds more than the {max} bytes read"),
        )
    };
    if meta.len() > max {
        return Err(too_large());
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    // The file may grow while it is read: never past the bound.
    file.take(max + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > max {
        return Err(too_large());
    }
    Ok(bytes)
}

/// What kind of file `meta` describes, for a message.
fn kind(meta: &std::fs::Metadata) -> &'static str {
    let file_type = meta.file_type();
    if file_type.is_dir() {
        return "a directory";
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a FIFO (named pipe)";
        }
        if file_type.is_char_device() {
            return "a character device";
        }
        if file_type.is_block_device() {
            return "a block device";
        }
        if file_type.is_socket() {
            return "a socket";
        }
    }
    "a special file"
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_regular_files_within_the_bound_are_read() -> io::Result<()> {
        let dir = tempfile::tempdir()?;
        let file = dir.path().join("f");
        std::fs::write(&file, b"12345")?;
        assert_eq!(read_regular_file(&file, 5)?, b"12345");
        let error = read_regular_file(&file, 4).expect_err("over the bound");
        assert!(error.to_string().contains("more than the 4 bytes"), "{error}");
        let error = read_regular_file(dir.path(), 100).expect_err("a directory");
        assert!(error.to_string().contains("a directory, not a regular file"), "{error}");
        #[cfg(unix)]
        {
            let error = read_regular_file(Path::new("/dev/zero"), 100).expect_err("a device");
            assert!(error.to_string().contains("a character device"), "{error}");
            let link = dir.path().join("zero");
            std::os::unix::fs::symlink("/dev/zero", &link)?;
            let error = read_regular_file(&link, 100).expect_err("a link to a device");
            assert!(error.to_string().contains("a character device"), "{error}");
            let fifo = dir.path().join("fifo");
            let path = std::ffi::CString::new(fifo.to_string_lossy().as_bytes())?;
            // SAFETY: a valid NUL-terminated path.
            assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
            let error = read_regular_file(&fifo, 100).expect_err("a FIFO, without blocking");
            assert!(error.to_string().contains("a FIFO"), "{error}");
        }
        Ok(())
    }
}
