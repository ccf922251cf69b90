//! The canonical JSON of a command's shown payload, written straight from the
//! command: the bytes `human::canonical_json` writes for
//! `trail::shown_payload`'s value (keys sorted, serde_json's scalars, every `env`
//! object's values replaced by commitments), without building that value first.
//! Every control change applied on every replica hashes its payload, and building
//! the `serde_json::Value` tree of a job spec, walking it for secrets and then
//! writing it took about a tenth of a follower's replica thread at 16 clients. For
//! the control-plane benchmark's submission this writes the same 530 bytes in 1.2 µs
//! against the value's 2.9 µs (release build, 2-core EPYC): the objects' entries
//! share one stack and one output buffer, so a command costs a few allocations
//! instead of one per field.
//!
//! What the value would hold decides the bytes, so this serializer mirrors
//! `serde_json::value::Serializer` case by case (unit as `null`, a variant's name
//! as a string, a newtype variant as a one-key object, a map's integer keys as
//! decimal strings, a non-finite float as `null`, the last of repeated keys). What
//! it does not mirror (a map key that is neither text nor an integer, an `env`
//! value that is not text) is an error, and the caller takes the value's path.

use std::borrow::Cow;
use std::fmt::Display;
use std::ops::Range;

use serde::ser::{self, Impossible, Serialize};
use sha2::Digest;

/// Why the direct path gave up: the caller writes the value instead.
#[derive(Debug, thiserror::Error)]
#[error("not written directly")]
pub(super) struct Unsupported;

impl ser::Error for Unsupported {
    fn custom<T: Display>(_: T) -> Self {
        Unsupported
    }
}

type Result<T> = std::result::Result<T, Unsupported>;

/// Serializer methods that hand their one argument to `self.$to`.
macro_rules! each_to {
    ($to:ident: $($method:ident($ty:ty)),* $(,)?) => {
        $(fn $method(self, v: $ty) -> Result<Self::Ok> {
            self.$to(v)
        })*
    };
}

/// The canonical JSON of `value` with every `env` object's values committed under
/// `salt`, and its top-level `type` field if it has a textual one.
#[cfg(test)]
pub(super) fn shown_canonical<T: Serialize + ?Sized>(
    value: &T,
    salt: &str,
) -> Result<(Vec<u8>, Option<String>)> {
    shown_canonical_with(value, salt, |json, kind| (json.to_vec(), kind))
}

/// Hands [`shown_canonical`]'s JSON and `type` to `read`, written in a buffer this
/// thread keeps: every replica writes one per job submission it applies, and a
/// buffer of its own each time cost growing it, and touching fresh pages, as often.
pub(super) fn shown_canonical_with<T: Serialize + ?Sized, R>(
    value: &T,
    salt: &str,
    read: impl FnOnce(&[u8], Option<String>) -> R,
) -> Result<R> {
    /// What a kept buffer may hold on to between commands.
    const KEPT_BYTES: usize = 64 << 10;
    thread_local! {
        static KEPT: std::cell::RefCell<Buf> = const { std::cell::RefCell::new(Buf::new()) };
    }
    let write = |buf: &mut Buf| {
        buf.out.clear();
        buf.stack.clear();
        let mut kind = None;
        let written = value.serialize(Writer {
            buf: &mut *buf,
            salt,
            mode: Mode::Plain,
            kind: Some(&mut kind),
        });
        let read = written.map(|()| read(&buf.out, kind));
        if buf.out.capacity() > KEPT_BYTES {
            buf.out = Vec::new();
        }
        if buf.stack.capacity() > KEPT_BYTES / 16 {
            buf.stack = Vec::new();
        }
        read
    };
    KEPT.with(|kept| match kept.try_borrow_mut() {
        Ok(mut buf) => write(&mut buf),
        // Only if a value's serialisation wrote another's: it gets a buffer of its own.
        Err(_) => write(&mut Buf::new()),
    })
}

/// The commitment `trail` shows instead of a secret.
pub(super) fn commitment(salt: &str, text: &str) -> String {
    let mut h = sha2::Sha256::new();
    h.update(salt.as_bytes());
    h.update([0]);
    h.update(text.as_bytes());
    let mut digits = [0; 32];
    hex::encode_to_slice(&h.finalize()[..16], &mut digits).expect("32 digits for 16 bytes");
    let digits = std::str::from_utf8(&digits).expect("hex digits are ASCII");
    format!("<secret sha256:{digits}>")
}

/// How the value being written is shown.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// As it is.
    Plain,
    /// The value of an `env` key: an object's values become commitments; anything
    /// else is shown as it is.
    Env,
}

/// What is written, and the entries of the objects open around the value being
/// written (an object's are the stack's top, from where it began), so that a
/// command is written with few allocations however deep its objects nest.
struct Buf {
    out: Vec<u8>,
    stack: Vec<(Cow<'static, str>, Range<usize>)>,
}

impl Buf {
    const fn new() -> Self {
        Buf {
            out: Vec::new(),
            stack: Vec::new(),
        }
    }
}

struct Writer<'a> {
    buf: &'a mut Buf,
    salt: &'a str,
    mode: Mode,
    /// Where the top-level object's textual `type` goes; `None` below the top.
    kind: Option<&'a mut Option<String>>,
}

impl<'a> Writer<'a> {
    /// A writer of a value inside the top-level one.
    fn nested(buf: &'a mut Buf, salt: &'a str, mode: Mode) -> Self {
        Writer {
            buf,
            salt,
            mode,
            kind: None,
        }
    }

    fn scalar<T: Serialize>(self, value: T) -> Result<()> {
        serde_json::to_writer(&mut self.buf.out, &value).map_err(|_| Unsupported)
    }

    fn object(self) -> Object<'a> {
        Object {
            base: self.buf.out.len(),
            stack_base: self.buf.stack.len(),
            buf: self.buf,
            salt: self.salt,
            secrets: self.mode == Mode::Env,
            key: None,
            kind: self.kind,
        }
    }

    fn array(self) -> Array<'a> {
        self.buf.out.push(b'[');
        Array {
            buf: self.buf,
            salt: self.salt,
            first: true,
        }
    }

    /// A variant whose content `content` writes after `{"variant":`.
    fn variant<C>(mut self, variant: &str, content: impl FnOnce(Self) -> C) -> Result<Variant<C>> {
        self.open_variant(variant)?;
        self.kind = None;
        Ok(Variant(content(self)))
    }

    /// `{"variant":` before a variant's content; the closing brace follows it. An
    /// `env` value that is a variant is shown by the value's path.
    fn open_variant(&mut self, variant: &str) -> Result<()> {
        if self.mode == Mode::Env {
            return Err(Unsupported);
        }
        self.mode = Mode::Plain;
        self.buf.out.push(b'{');
        serde_json::to_writer(&mut self.buf.out, variant).map_err(|_| Unsupported)?;
        self.buf.out.push(b':');
        Ok(())
    }
}

/// An object being written: each value goes to the end of `out` and its entry on
/// the stack, and `finish` puts the entries in key order in place of what was
/// written since `base`.
struct Object<'a> {
    buf: &'a mut Buf,
    salt: &'a str,
    /// The values are an `env` object's: each is shown as its commitment.
    secrets: bool,
    base: usize,
    stack_base: usize,
    key: Option<String>,
    kind: Option<&'a mut Option<String>>,
}

impl<'a> Object<'a> {
    fn entry<T: Serialize + ?Sized>(&mut self, key: Cow<'static, str>, value: &T) -> Result<()> {
        let start = self.buf.out.len();
        if self.secrets {
            let text = value.serialize(Leaf::Text)?;
            serde_json::to_writer(&mut self.buf.out, &commitment(self.salt, &text))
                .map_err(|_| Unsupported)?;
        } else {
            let mode = if key == "env" { Mode::Env } else { Mode::Plain };
            value.serialize(Writer::nested(&mut *self.buf, self.salt, mode))?;
        }
        let end = self.buf.out.len();
        if let (Some(kind), "type") = (self.kind.as_deref_mut(), &*key) {
            *kind =
                Some(serde_json::from_slice(&self.buf.out[start..end]).map_err(|_| Unsupported)?);
        }
        self.buf.stack.push((key, start..end));
        Ok(())
    }

    /// Puts the entries in place; what follows goes after them.
    fn finish(self) -> Result<&'a mut Buf> {
        let Buf { out, stack } = &mut *self.buf;
        let entries = &mut stack[self.stack_base..];
        // A map keeps the last of repeated keys, in the place of the first.
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        let tail = out.len();
        out.push(b'{');
        let mut first = true;
        for (i, (key, range)) in entries.iter().enumerate() {
            if entries.get(i + 1).is_some_and(|next| next.0 == *key) {
                continue;
            }
            if !first {
                out.push(b',');
            }
            first = false;
            serde_json::to_writer(&mut *out, key).map_err(|_| Unsupported)?;
            out.push(b':');
            out.extend_from_within(range.clone());
        }
        out.push(b'}');
        out.copy_within(tail.., self.base);
        out.truncate(self.base + out.len() - tail);
        stack.truncate(self.stack_base);
        Ok(self.buf)
    }
}

struct Array<'a> {
    buf: &'a mut Buf,
    salt: &'a str,
    first: bool,
}

impl Array<'_> {
    fn element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        if !self.first {
            self.buf.out.push(b',');
        }
        self.first = false;
        value.serialize(Writer::nested(&mut *self.buf, self.salt, Mode::Plain))
    }

    fn end(self) -> Result<()> {
        self.buf.out.push(b']');
        Ok(())
    }
}

/// A variant's content, closed with the brace `open_variant` opened.
struct Variant<T>(T);

impl<'a> ser::Serializer for Writer<'a> {
    type Ok = ();
    type Error = Unsupported;
    type SerializeSeq = Array<'a>;
    type SerializeTuple = Array<'a>;
    type SerializeTupleStruct = Array<'a>;
    type SerializeTupleVariant = Variant<Array<'a>>;
    type SerializeMap = Object<'a>;
    type SerializeStruct = Object<'a>;
    type SerializeStructVariant = Variant<Object<'a>>;

    each_to!(scalar: serialize_bool(bool), serialize_i8(i8), serialize_i16(i16), serialize_i32(i32),
        serialize_i64(i64), serialize_u8(u8), serialize_u16(u16), serialize_u32(u32),
        serialize_u64(u64), serialize_char(char), serialize_str(&str), serialize_bytes(&[u8]));
    fn serialize_f32(self, v: f32) -> Result<()> {
        // The value holds an f32 as the f64 it widens to.
        self.serialize_f64(f64::from(v))
    }
    fn serialize_f64(self, v: f64) -> Result<()> {
        if v.is_finite() {
            self.scalar(v)
        } else {
            self.serialize_unit()
        }
    }
    fn serialize_none(self) -> Result<()> {
        self.serialize_unit()
    }
    fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<()> {
        value.serialize(self)
    }
    fn serialize_unit(self) -> Result<()> {
        self.buf.out.extend_from_slice(b"null");
        Ok(())
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<()> {
        self.serialize_unit()
    }
    fn serialize_unit_variant(self, _: &'static str, _: u32, variant: &'static str) -> Result<()> {
        self.scalar(variant)
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<()> {
        value.serialize(self)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        mut self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        value: &T,
    ) -> Result<()> {
        self.open_variant(variant)?;
        value.serialize(Writer::nested(&mut *self.buf, self.salt, Mode::Plain))?;
        self.buf.out.push(b'}');
        Ok(())
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Array<'a>> {
        Ok(self.array())
    }
    fn serialize_tuple(self, _: usize) -> Result<Array<'a>> {
        Ok(self.array())
    }
    fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Array<'a>> {
        Ok(self.array())
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Variant<Array<'a>>> {
        self.variant(variant, Writer::array)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Object<'a>> {
        Ok(self.object())
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Object<'a>> {
        Ok(self.object())
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
        _: usize,
    ) -> Result<Variant<Object<'a>>> {
        self.variant(variant, Writer::object)
    }
}

/// An array is written alike whether serde calls it a sequence, a tuple or a tuple
/// struct.
macro_rules! array_impl {
    ($($trait:ident::$method:ident),*) => {$(
        impl ser::$trait for Array<'_> {
            type Ok = ();
            type Error = Unsupported;
            fn $method<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
                self.element(value)
            }
            fn end(self) -> Result<()> {
                Array::end(self)
            }
        }
    )*};
}

array_impl!(
    SerializeSeq::serialize_element,
    SerializeTuple::serialize_element,
    SerializeTupleStruct::serialize_field
);

impl ser::SerializeTupleVariant for Variant<Array<'_>> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        self.0.element(value)
    }
    fn end(self) -> Result<()> {
        self.0.buf.out.extend_from_slice(b"]}");
        Ok(())
    }
}

impl ser::SerializeMap for Object<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_key<T: Serialize + ?Sized>(&mut self, key: &T) -> Result<()> {
        self.key = Some(key.serialize(Leaf::Key)?);
        Ok(())
    }
    fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<()> {
        let key = self.key.take().ok_or(Unsupported)?;
        self.entry(Cow::Owned(key), value)
    }
    fn end(self) -> Result<()> {
        self.finish().map(drop)
    }
}

impl ser::SerializeStruct for Object<'_> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.entry(Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<()> {
        self.finish().map(drop)
    }
}

impl ser::SerializeStructVariant for Variant<Object<'_>> {
    type Ok = ();
    type Error = Unsupported;
    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<()> {
        self.0.entry(Cow::Borrowed(key), value)
    }
    fn end(self) -> Result<()> {
        self.0.finish()?.out.push(b'}');
        Ok(())
    }
}

/// A string as the value would hold it in two places: a map key (text, or an
/// integer or a unit variant as its text) and an `env` value whose commitment is
/// made of its text (text alone; anything else goes the value's way).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Leaf {
    Key,
    Text,
}

impl Leaf {
    /// `v` as text where a key is read, refused where an `env` value is.
    fn key_only(self, v: impl ToString) -> Result<String> {
        match self {
            Leaf::Key => Ok(v.to_string()),
            Leaf::Text => Err(Unsupported),
        }
    }

    fn refuse<T>(self, _: T) -> Result<String> {
        Err(Unsupported)
    }
}

impl ser::Serializer for Leaf {
    type Ok = String;
    type Error = Unsupported;
    type SerializeSeq = Impossible<String, Unsupported>;
    type SerializeTuple = Impossible<String, Unsupported>;
    type SerializeTupleStruct = Impossible<String, Unsupported>;
    type SerializeTupleVariant = Impossible<String, Unsupported>;
    type SerializeMap = Impossible<String, Unsupported>;
    type SerializeStruct = Impossible<String, Unsupported>;
    type SerializeStructVariant = Impossible<String, Unsupported>;

    fn serialize_str(self, v: &str) -> Result<String> {
        Ok(v.to_owned())
    }
    fn serialize_newtype_struct<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        value: &T,
    ) -> Result<String> {
        value.serialize(self)
    }
    each_to!(key_only: serialize_char(char), serialize_i8(i8), serialize_i16(i16),
        serialize_i32(i32), serialize_i64(i64), serialize_u8(u8), serialize_u16(u16),
        serialize_u32(u32), serialize_u64(u64));
    each_to!(refuse: serialize_bool(bool), serialize_f32(f32), serialize_f64(f64),
        serialize_bytes(&[u8]));
    fn serialize_unit_variant(
        self,
        _: &'static str,
        _: u32,
        variant: &'static str,
    ) -> Result<String> {
        self.key_only(variant)
    }
    fn serialize_none(self) -> Result<String> {
        Err(Unsupported)
    }
    fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<String> {
        Err(Unsupported)
    }
    fn serialize_unit(self) -> Result<String> {
        Err(Unsupported)
    }
    fn serialize_unit_struct(self, _: &'static str) -> Result<String> {
        Err(Unsupported)
    }
    fn serialize_newtype_variant<T: Serialize + ?Sized>(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: &T,
    ) -> Result<String> {
        Err(Unsupported)
    }
    fn serialize_seq(self, _: Option<usize>) -> Result<Self::SerializeSeq> {
        Err(Unsupported)
    }
    fn serialize_tuple(self, _: usize) -> Result<Self::SerializeTuple> {
        Err(Unsupported)
    }
    fn serialize_tuple_struct(
        self,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleStruct> {
        Err(Unsupported)
    }
    fn serialize_tuple_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeTupleVariant> {
        Err(Unsupported)
    }
    fn serialize_map(self, _: Option<usize>) -> Result<Self::SerializeMap> {
        Err(Unsupported)
    }
    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self::SerializeStruct> {
        Err(Unsupported)
    }
    fn serialize_struct_variant(
        self,
        _: &'static str,
        _: u32,
        _: &'static str,
        _: usize,
    ) -> Result<Self::SerializeStructVariant> {
        Err(Unsupported)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use aigrid_consensus::human;
    use serde::Serialize;

    use super::*;

    /// What the value's path writes: the value, its secrets committed, canonical.
    fn by_value<T: Serialize>(value: &T, salt: &str) -> (Vec<u8>, Option<String>) {
        let mut v = serde_json::to_value(value).unwrap();
        super::super::trail::commit_secrets(&mut v, salt);
        let kind = v.get("type").and_then(|t| t.as_str()).map(str::to_owned);
        (human::canonical_json(&v), kind)
    }

    fn same<T: Serialize>(value: &T) {
        let direct = shown_canonical(value, "7").expect("written directly");
        assert_eq!(
            String::from_utf8(direct.0.clone()).unwrap(),
            String::from_utf8(by_value(value, "7").0).unwrap()
        );
        assert_eq!(direct.1, by_value(value, "7").1);
    }

    #[test]
    fn a_commitment_is_the_first_half_of_the_salted_digest_in_hex() {
        // A signer recomputes it: SHA-256 of salt, a zero byte and the secret, its
        // first 16 bytes as 32 lowercase hex digits.
        assert_eq!(
            commitment("17", "hunter2"),
            "<secret sha256:aeaf32c17481937291029c96540c5c74>"
        );
    }

    #[derive(Serialize)]
    enum Shape {
        Unit,
        New(u8),
        Pair(i32, String),
        Named { z: bool, a: Option<u64> },
    }

    #[derive(Serialize)]
    #[serde(tag = "type", rename_all = "snake_case")]
    enum Tagged {
        Plain {
            zeta: f64,
            alpha: f32,
            env: BTreeMap<String, String>,
            nested: Vec<Inner>,
            shapes: Vec<Shape>,
            keys: BTreeMap<u16, &'static str>,
            none: Option<String>,
            text: String,
            bytes: Vec<u8>,
        },
        Wrapped(Inner),
    }

    #[derive(Serialize)]
    struct Inner {
        name: &'static str,
        env: Option<BTreeMap<String, String>>,
        #[serde(flatten)]
        extra: BTreeMap<String, i64>,
    }

    #[derive(Serialize)]
    struct NotAnObject {
        env: Vec<Inner>,
        kind: u8,
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn inner(name: &'static str) -> Inner {
        Inner {
            name,
            env: Some(env(&[("TOKEN", "s3cr\"et\n"), ("MODE", "")])),
            extra: [("b".to_owned(), -3), ("a".to_owned(), i64::MAX)].into(),
        }
    }

    #[test]
    fn writes_the_bytes_of_the_committed_value() {
        same(&Tagged::Plain {
            zeta: 1.5,
            alpha: 0.1,
            env: env(&[("A", "1"), ("B", "two é \u{1F600}")]),
            nested: vec![inner("x"), inner("y")],
            shapes: vec![
                Shape::Unit,
                Shape::New(7),
                Shape::Pair(-1, "p".into()),
                Shape::Named { z: true, a: None },
            ],
            keys: [(10, "ten"), (9, "nine")].into(),
            none: None,
            text: "tab\there \\ \u{7f} \u{1}".into(),
            bytes: vec![0, 255],
        });
        same(&Tagged::Wrapped(inner("w")));
        same(&NotAnObject {
            env: vec![inner("in a list")],
            kind: 3,
        });
        same(&[f64::NAN, f64::INFINITY, 2.0, -0.0]);
        same(&Shape::Named {
            z: false,
            a: Some(u64::MAX),
        });
    }

    #[test]
    fn a_repeated_key_keeps_its_last_value() {
        #[derive(Serialize)]
        struct Twice {
            a: u8,
            #[serde(flatten)]
            more: BTreeMap<String, u8>,
        }
        same(&Twice {
            a: 1,
            more: [("a".to_owned(), 2), ("0".to_owned(), 0)].into(),
        });
    }

    #[test]
    fn what_it_cannot_write_is_left_to_the_value() {
        #[derive(Serialize)]
        struct NumberSecret {
            env: BTreeMap<String, u8>,
        }
        #[derive(Serialize)]
        struct VariantEnv {
            env: Shape,
        }
        #[derive(Serialize)]
        struct BoolKeys {
            map: BTreeMap<bool, u8>,
        }
        #[derive(Serialize)]
        struct NumberType {
            #[serde(rename = "type")]
            kind: u8,
        }
        assert!(shown_canonical(&NumberType { kind: 1 }, "s").is_err());
        let number = NumberSecret {
            env: [("N".to_owned(), 1)].into(),
        };
        assert!(shown_canonical(&number, "s").is_err());
        assert!(shown_canonical(&VariantEnv { env: Shape::New(1) }, "s").is_err());
        let keys = BoolKeys {
            map: [(true, 1)].into(),
        };
        assert!(shown_canonical(&keys, "s").is_err());
    }
}
