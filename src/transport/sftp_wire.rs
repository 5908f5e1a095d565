//! The SFTP (version 3) wire format, for the pipelined client of
//! [`crate::transport::stream`]: requests encoded into one outgoing buffer,
//! replies decoded from the incoming bytes as they come. libssh2's SFTP API
//! waits for every reply before the next request; this does not, so many
//! files' requests can be in flight on one channel at once.
//!
//! Only what a delivery needs: open (exclusive create), write, fstat, close,
//! mkdir, symlink, rename (and OpenSSH's `posix-rename@openssh.com`),
//! remove. No I/O here.

/// Request and reply types (draft-ietf-secsh-filexfer-02).
const INIT: u8 = 1;
const VERSION: u8 = 2;
const OPEN: u8 = 3;
const CLOSE: u8 = 4;
const WRITE: u8 = 6;
const FSTAT: u8 = 8;
const REMOVE: u8 = 13;
const MKDIR: u8 = 14;
const REALPATH: u8 = 16;
const RENAME: u8 = 18;
const SYMLINK: u8 = 20;
const STATUS: u8 = 101;
const HANDLE: u8 = 102;
const NAME: u8 = 104;
const ATTRS: u8 = 105;
const EXTENDED: u8 = 200;

const OPEN_WRITE: u32 = 0x02;
const OPEN_CREAT: u32 = 0x08;
const OPEN_TRUNC: u32 = 0x10;
const OPEN_EXCL: u32 = 0x20;

const ATTR_SIZE: u32 = 0x1;
const ATTR_UIDGID: u32 = 0x2;
const ATTR_PERMISSIONS: u32 = 0x4;
const ATTR_ACMODTIME: u32 = 0x8;
const ATTR_EXTENDED: u32 = 0x8000_0000;

/// The largest packet accepted from a server (OpenSSH sends at most 256 KiB).
const MAX_PACKET: usize = 1 << 20;

/// Status code: success.
pub const OK: u32 = 0;

/// A decoded reply to request `id`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Status {
        code: u32,
        message: String,
    },
    Handle(Vec<u8>),
    /// File attributes; only the size is kept.
    Attrs {
        size: Option<u64>,
    },
    /// The first name of a NAME reply (REALPATH's answer).
    Name(Vec<u8>),
    /// A reply of a type this client never asks for.
    Other(u8),
}

/// The name of an SFTP status code, for messages.
pub fn status_name(code: u32) -> &'static str {
    match code {
        0 => "ok",
        1 => "end of file",
        2 => "no such file",
        3 => "permission denied",
        4 => "failure",
        5 => "bad message",
        6 => "no connection",
        7 => "connection lost",
        8 => "operation unsupported",
        _ => "unknown status",
    }
}

/// Builds request packets into `out`; hands out request ids.
#[derive(Default)]
pub struct Requests {
    next_id: u32,
}

fn put_u32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_be_bytes());
}

fn put_str(b: &mut Vec<u8>, s: &[u8]) {
    put_u32(b, u32::try_from(s.len()).unwrap_or(u32::MAX));
    b.extend_from_slice(s);
}

/// Append a packet of `kind` whose body `body` writes (after the length and
/// type), returning nothing: the caller knows its id.
fn packet(out: &mut Vec<u8>, kind: u8, body: impl FnOnce(&mut Vec<u8>)) {
    let start = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, kind]);
    body(out);
    let len = u32::try_from(out.len() - start - 4).unwrap_or(u32::MAX);
    out[start..start + 4].copy_from_slice(&len.to_be_bytes());
}

/// The client's first packet.
pub fn init(out: &mut Vec<u8>) {
    packet(out, INIT, |b| put_u32(b, 3));
}

impl Requests {
    fn id(&mut self) -> u32 {
        self.next_id = self.next_id.wrapping_add(1);
        self.next_id
    }

    fn simple(&mut self, out: &mut Vec<u8>, kind: u8, args: &[&[u8]]) -> u32 {
        let id = self.id();
        packet(out, kind, |b| {
            put_u32(b, id);
            for a in args {
                put_str(b, a);
            }
        });
        id
    }

    /// Create `path` for writing; it must not exist. `mode`: permission bits
    /// (the server's umask applies, as with `scp`).
    pub fn create(&mut self, out: &mut Vec<u8>, path: &str, mode: u32) -> u32 {
        let id = self.id();
        packet(out, OPEN, |b| {
            put_u32(b, id);
            put_str(b, path.as_bytes());
            put_u32(b, OPEN_WRITE | OPEN_CREAT | OPEN_TRUNC | OPEN_EXCL);
            put_u32(b, ATTR_PERMISSIONS);
            put_u32(b, mode & 0o7777);
        });
        id
    }

    pub fn write(&mut self, out: &mut Vec<u8>, handle: &[u8], offset: u64, data: &[u8]) -> u32 {
        let r = self.write_with(out, handle, offset, data.len(), |b| {
            b.copy_from_slice(data);
            Ok(())
        });
        r.unwrap_or_default()
    }

    /// A write request of `len` bytes that `fill` puts straight into `out`
    /// (no copy of the data in between); nothing is added if `fill` fails.
    pub fn write_with(
        &mut self,
        out: &mut Vec<u8>,
        handle: &[u8],
        offset: u64,
        len: usize,
        fill: impl FnOnce(&mut [u8]) -> std::io::Result<()>,
    ) -> std::io::Result<u32> {
        let id = self.id();
        let start = out.len();
        let mut data_at = 0;
        packet(out, WRITE, |b| {
            put_u32(b, id);
            put_str(b, handle);
            b.extend_from_slice(&offset.to_be_bytes());
            put_u32(b, u32::try_from(len).unwrap_or(u32::MAX));
            data_at = b.len();
            b.resize(data_at + len, 0);
        });
        if let Err(e) = fill(&mut out[data_at..]) {
            out.truncate(start);
            return Err(e);
        }
        Ok(id)
    }

    pub fn fstat(&mut self, out: &mut Vec<u8>, handle: &[u8]) -> u32 {
        self.simple(out, FSTAT, &[handle])
    }

    pub fn close(&mut self, out: &mut Vec<u8>, handle: &[u8]) -> u32 {
        self.simple(out, CLOSE, &[handle])
    }

    pub fn remove(&mut self, out: &mut Vec<u8>, path: &str) -> u32 {
        self.simple(out, REMOVE, &[path.as_bytes()])
    }

    /// The absolute, canonical form of `path` (`.`: the login's start
    /// directory, its home).
    pub fn realpath(&mut self, out: &mut Vec<u8>, path: &str) -> u32 {
        self.simple(out, REALPATH, &[path.as_bytes()])
    }

    pub fn mkdir(&mut self, out: &mut Vec<u8>, path: &str) -> u32 {
        let id = self.id();
        packet(out, MKDIR, |b| {
            put_u32(b, id);
            put_str(b, path.as_bytes());
            put_u32(b, 0); // no attributes: the server's default mode
        });
        id
    }

    /// A symlink at `link` whose target is `target`. OpenSSH reads the two
    /// paths in the reverse of the draft's order (target first), as does
    /// libssh2, which this matches.
    pub fn symlink(&mut self, out: &mut Vec<u8>, target: &str, link: &str) -> u32 {
        self.simple(out, SYMLINK, &[target.as_bytes(), link.as_bytes()])
    }

    /// Rename `from` to `to`: with `posix`, OpenSSH's extension that
    /// replaces `to` atomically; else SFTP v3's, which fails if `to` exists.
    pub fn rename(&mut self, out: &mut Vec<u8>, from: &str, to: &str, posix: bool) -> u32 {
        if !posix {
            return self.simple(out, RENAME, &[from.as_bytes(), to.as_bytes()]);
        }
        let name = b"posix-rename@openssh.com";
        self.simple(out, EXTENDED, &[name, from.as_bytes(), to.as_bytes()])
    }
}

/// Reads big-endian fields from a packet body.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (h, t) = self.0.split_at_checked(4)?;
        self.0 = t;
        Some(u32::from_be_bytes(h.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        let (h, t) = self.0.split_at_checked(8)?;
        self.0 = t;
        Some(u64::from_be_bytes(h.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        let (h, t) = self.0.split_at_checked(n)?;
        self.0 = t;
        Some(h)
    }
}

fn attrs_size(c: &mut Cursor<'_>) -> Option<Option<u64>> {
    let flags = c.u32()?;
    let size = if flags & ATTR_SIZE != 0 {
        Some(c.u64()?)
    } else {
        None
    };
    if flags & ATTR_UIDGID != 0 {
        c.u32()?;
        c.u32()?;
    }
    if flags & ATTR_PERMISSIONS != 0 {
        c.u32()?;
    }
    if flags & ATTR_ACMODTIME != 0 {
        c.u32()?;
        c.u32()?;
    }
    if flags & ATTR_EXTENDED != 0 {
        for _ in 0..c.u32()? {
            c.bytes()?;
            c.bytes()?;
        }
    }
    Some(size)
}

/// A malformed packet from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadPacket(pub String);

/// Incoming bytes → packets.
#[derive(Default)]
pub struct Replies {
    buf: Vec<u8>,
}

impl Replies {
    pub fn feed(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next whole packet: its type and body.
    fn packet(&mut self) -> Result<Option<(u8, Vec<u8>)>, BadPacket> {
        let Some(head) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        if len == 0 || len > MAX_PACKET {
            return Err(BadPacket(format!("sftp packet of {len} bytes")));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let kind = self.buf[4];
        let body = self.buf[5..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some((kind, body)))
    }

    /// The server's VERSION: its version and extension names.
    pub fn version(&mut self) -> Result<Option<(u32, Vec<String>)>, BadPacket> {
        let Some((kind, body)) = self.packet()? else {
            return Ok(None);
        };
        let bad = || BadPacket("malformed sftp version".into());
        if kind != VERSION {
            return Err(BadPacket(format!(
                "sftp: expected VERSION, got type {kind}"
            )));
        }
        let mut c = Cursor(&body);
        let version = c.u32().ok_or_else(bad)?;
        let mut ext = Vec::new();
        while !c.0.is_empty() {
            let name = c.bytes().ok_or_else(bad)?;
            c.bytes().ok_or_else(bad)?;
            ext.push(String::from_utf8_lossy(name).into_owned());
        }
        Ok(Some((version, ext)))
    }

    /// The next reply, with its request id.
    pub fn next_reply(&mut self) -> Result<Option<(u32, Reply)>, BadPacket> {
        let Some((kind, body)) = self.packet()? else {
            return Ok(None);
        };
        let bad = || BadPacket(format!("malformed sftp reply of type {kind}"));
        let mut c = Cursor(&body);
        let id = c.u32().ok_or_else(bad)?;
        let reply = match kind {
            STATUS => {
                let code = c.u32().ok_or_else(bad)?;
                // the message is optional in some servers' replies
                let message = c
                    .bytes()
                    .map(|m| String::from_utf8_lossy(m).into_owned())
                    .unwrap_or_default();
                Reply::Status { code, message }
            }
            HANDLE => Reply::Handle(c.bytes().ok_or_else(bad)?.to_vec()),
            ATTRS => Reply::Attrs {
                size: attrs_size(&mut c).ok_or_else(bad)?,
            },
            NAME if c.u32().ok_or_else(bad)? > 0 => {
                Reply::Name(c.bytes().ok_or_else(bad)?.to_vec())
            }
            k => Reply::Other(k),
        };
        Ok(Some((id, reply)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server's reply packet, for the decoder.
    fn reply(kind: u8, body: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut out = Vec::new();
        packet(&mut out, kind, body);
        out
    }

    #[test]
    fn requests_are_framed_with_length_type_and_rising_ids() {
        let mut r = Requests::default();
        let mut out = Vec::new();
        let a = r.create(&mut out, "/d/.t", 0o100644);
        let b = r.write(&mut out, b"h1", 5, b"xyz");
        assert_eq!((a, b), (1, 2));
        // OPEN: len, type 3, id 1, "/d/.t", flags, attr flags, perm
        assert_eq!(&out[..4], &(1 + 4 + 4 + 5 + 4 + 4 + 4u32).to_be_bytes());
        assert_eq!(out[4], OPEN);
        assert_eq!(&out[9..13], &5u32.to_be_bytes());
        assert_eq!(&out[13..18], b"/d/.t");
        assert_eq!(&out[18..22], &0x3au32.to_be_bytes());
        assert_eq!(
            &out[26..30],
            &0o644u32.to_be_bytes(),
            "file type bits dropped"
        );
        let w = &out[30..];
        assert_eq!(&w[..4], &(1 + 4 + 4 + 2 + 8 + 4 + 3u32).to_be_bytes());
        assert_eq!(w[4], WRITE);
        assert_eq!(&w[15..23], &5u64.to_be_bytes());
        assert_eq!(&w[27..], b"xyz");
    }

    #[test]
    fn replies_are_decoded_whole_even_when_they_arrive_in_pieces() {
        let mut bytes = reply(STATUS, |b| {
            put_u32(b, 7);
            put_u32(b, 4);
            put_str(b, b"Failure");
            put_str(b, b"");
        });
        bytes.extend(reply(HANDLE, |b| {
            put_u32(b, 8);
            put_str(b, b"\0\0\0\x01");
        }));
        bytes.extend(reply(NAME, |b| {
            put_u32(b, 10);
            put_u32(b, 1);
            put_str(b, b"/home/u");
            put_str(b, b"drwx------ u u /home/u");
            put_u32(b, 0);
        }));
        bytes.extend(reply(ATTRS, |b| {
            put_u32(b, 9);
            put_u32(
                b,
                ATTR_SIZE | ATTR_UIDGID | ATTR_PERMISSIONS | ATTR_ACMODTIME,
            );
            b.extend_from_slice(&123_456u64.to_be_bytes());
            for v in [1000, 1000, 0o100644, 1, 2] {
                put_u32(b, v);
            }
        }));
        let mut r = Replies::default();
        let mut got = Vec::new();
        for chunk in bytes.chunks(3) {
            r.feed(chunk);
            while let Some(x) = r.next_reply().unwrap() {
                got.push(x);
            }
        }
        assert_eq!(
            got,
            vec![
                (
                    7,
                    Reply::Status {
                        code: 4,
                        message: "Failure".into()
                    }
                ),
                (8, Reply::Handle(vec![0, 0, 0, 1])),
                (10, Reply::Name(b"/home/u".to_vec())),
                (
                    9,
                    Reply::Attrs {
                        size: Some(123_456)
                    }
                ),
            ]
        );
    }

    #[test]
    fn a_version_lists_its_extensions_and_nonsense_is_refused() {
        let mut r = Replies::default();
        r.feed(&reply(VERSION, |b| {
            put_u32(b, 3);
            put_str(b, b"posix-rename@openssh.com");
            put_str(b, b"1");
        }));
        assert_eq!(
            r.version().unwrap(),
            Some((3, vec!["posix-rename@openssh.com".to_string()]))
        );
        let mut r = Replies::default();
        r.feed(&[0xff, 0xff, 0xff, 0xff, 101]);
        assert!(r.next_reply().is_err());
    }
}
