//! NumPy `.npy` arrays: the header parsed here (a Python dict literal, read by a small parser
//! of its own, never evaluated), the data read after it.
//!
//! Every length in a header is checked before anything is allocated: the header itself is at
//! most [`MAX_HEADER_BYTES`], the data it announces at most [`MAX_NPY_BYTES`] and
//! [`MAX_ELEMENTS`] values, and the data are read through a limit of what the header announces
//! (a header that claims more than the file holds is reported as truncated after reading what
//! is there, never pre-allocated). Big-endian data are byte-swapped and Fortran-order arrays
//! transposed, so an [`NpyArray`] is always C order, little-endian.

use std::io::Read;

use super::{DataError, Dataset};
use crate::peer::escape;

/// The magic string every `.npy` file starts with.
pub const MAGIC: &[u8; 6] = b"\x93NUMPY";
/// The longest header read (NumPy writes 128 bytes or so; it refuses to read over 10 000).
pub const MAX_HEADER_BYTES: usize = 1 << 16;
/// The most data bytes an array may announce.
pub const MAX_NPY_BYTES: u64 = 1 << 32;
/// The most values an array may announce (as `f32` features, 4 GiB).
pub const MAX_ELEMENTS: u64 = 1 << 30;
/// The most classes labels may imply when `classes` is not given: as many as a model head can
/// have (its confusion matrix, classes squared, fits in the model's limit).
pub const MAX_CLASSES: usize = crate::model::MAX_CONFUSION_CELLS.isqrt();

type Result<T> = std::result::Result<T, DataError>;

/// What kind of numbers an array holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Float,
    Int,
    Uint,
}

/// An element type this reader understands (`<f4`, `|u1`, `>i8`, ...).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dtype {
    pub kind: Kind,
    /// Bytes per element.
    pub size: usize,
    pub big_endian: bool,
    /// As the header wrote it, for messages.
    pub descr: String,
}

/// A parsed `.npy` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NpyHeader {
    pub dtype: Dtype,
    pub fortran_order: bool,
    pub shape: Vec<usize>,
    /// Number of elements (the product of `shape`).
    pub elements: usize,
    /// Bytes of data that follow the header.
    pub data_bytes: usize,
}

/// An array read from a `.npy` file: C order, little-endian bytes.
#[derive(Debug, Clone, PartialEq)]
pub struct NpyArray {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn shape_text(shape: &[usize]) -> String {
    match shape {
        [one] => format!("({one},)"),
        _ => format!("({})", shape.iter().map(usize::to_string).collect::<Vec<_>>().join(", ")),
    }
}

/// Parses the element type of a `descr` string.
fn parse_descr(descr: &str) -> std::result::Result<Dtype, String> {
    // The header's text, as it may appear in a message (file-controlled: escaped).
    let shown = escape(descr, 40);
    let bytes = descr.as_bytes();
    let (order, rest) = match bytes.first() {
        Some(b'<' | b'>' | b'|' | b'=') => (bytes[0], &descr[1..]),
        _ => (b'=', descr),
    };
    let mut chars = rest.chars();
    let kind_char = chars.next().ok_or_else(|| format!("dtype '{shown}' is empty"))?;
    if kind_char == 'O' {
        return Err(format!(
            "dtype '{shown}' is an object array (pickled Python objects), which is never read; save a numeric array"
        ));
    }
    let size: usize = chars.as_str().parse().map_err(|_| format!("dtype '{shown}' is not a NumPy type string"))?;
    let kind = match kind_char {
        'f' if size == 4 || size == 8 => Kind::Float,
        'i' if [1, 2, 4, 8].contains(&size) => Kind::Int,
        'u' if [1, 2, 4, 8].contains(&size) => Kind::Uint,
        _ => {
            return Err(format!(
                "dtype '{shown}' is not supported: arrays of float32, float64 or integers (int8 to uint64) are read"
            ))
        }
    };
    Ok(Dtype { kind, size, big_endian: order == b'>', descr: descr.to_string() })
}

/// A value of the header's dict.
#[derive(Debug)]
enum Value {
    Str(String),
    Bool(bool),
    Tuple(Vec<u64>),
}

/// The header dict: `{'descr': '<f4', 'fortran_order': False, 'shape': (3, 4), }`.
struct DictParser<'a> {
    text: &'a [u8],
    at: usize,
}

impl DictParser<'_> {
    fn skip_space(&mut self) {
        while self.text.get(self.at).is_some_and(|c| c.is_ascii_whitespace()) {
            self.at += 1;
        }
    }
    fn peek(&mut self) -> Option<u8> {
        self.skip_space();
        self.text.get(self.at).copied()
    }
    fn expect(&mut self, c: u8) -> std::result::Result<(), String> {
        match self.peek() {
            Some(found) if found == c => {
                self.at += 1;
                Ok(())
            }
            Some(found) => Err(format!(
                "expected `{}` at byte {} of the header, found `{}`",
                c as char,
                self.at,
                found.escape_ascii()
            )),
            None => Err(format!("the header ends where `{}` was expected", c as char)),
        }
    }
    fn string(&mut self) -> std::result::Result<String, String> {
        let quote = self
            .peek()
            .filter(|&q| q == b'\'' || q == b'"')
            .ok_or_else(|| format!("expected a quoted string at byte {} of the header", self.at))?;
        self.at += 1;
        let start = self.at;
        while let Some(&c) = self.text.get(self.at) {
            if c == quote {
                let s = std::str::from_utf8(&self.text[start..self.at])
                    .map_err(|_| "a string in the header is not UTF-8".to_string())?;
                self.at += 1;
                return Ok(s.to_string());
            }
            if c == b'\\' {
                return Err("escapes in header strings are not supported".into());
            }
            self.at += 1;
        }
        Err("a string in the header is not closed".into())
    }
    fn word(&mut self) -> &[u8] {
        self.skip_space();
        let start = self.at;
        while self.text.get(self.at).is_some_and(|c| c.is_ascii_alphanumeric() || *c == b'_') {
            self.at += 1;
        }
        &self.text[start..self.at]
    }
    fn value(&mut self) -> std::result::Result<Value, String> {
        match self.peek() {
            Some(b'\'' | b'"') => Ok(Value::Str(self.string()?)),
            Some(b'(') => {
                self.at += 1;
                let mut dims = Vec::new();
                loop {
                    if self.peek() == Some(b')') {
                        self.at += 1;
                        return Ok(Value::Tuple(dims));
                    }
                    let word = self.word();
                    let digits = word.strip_suffix(b"L").unwrap_or(word);
                    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
                        return Err(format!(
                            "the shape holds `{}`, not a non-negative integer",
                            String::from_utf8_lossy(word)
                        ));
                    }
                    let dim = std::str::from_utf8(digits)
                        .ok()
                        .and_then(|d| d.parse::<u64>().ok())
                        .ok_or_else(|| format!("the dimension {} is too large", String::from_utf8_lossy(digits)))?;
                    dims.push(dim);
                    if dims.len() > 32 {
                        return Err("the shape has more than 32 dimensions (NumPy's limit)".into());
                    }
                    match self.peek() {
                        Some(b',') => self.at += 1,
                        Some(b')') => {}
                        _ => return Err("the shape is not a tuple of integers".into()),
                    }
                }
            }
            Some(b'[' | b'{') => Err("a value in the header is a list or dict (a structured dtype?); only simple \
                                      arrays are read"
                .into()),
            _ => match self.word() {
                b"True" => Ok(Value::Bool(true)),
                b"False" => Ok(Value::Bool(false)),
                other => Err(format!("unexpected `{}` in the header", String::from_utf8_lossy(other))),
            },
        }
    }
}

/// Parses the header dict (the text after the length field).
fn parse_dict(text: &[u8]) -> std::result::Result<(String, bool, Vec<u64>), String> {
    let mut p = DictParser { text, at: 0 };
    p.expect(b'{')?;
    let (mut descr, mut fortran, mut shape) = (None, None, None);
    loop {
        if p.peek() == Some(b'}') {
            p.at += 1;
            break;
        }
        let key = p.string()?;
        p.expect(b':')?;
        let value = p.value()?;
        let slot_taken = match (key.as_str(), value) {
            ("descr", Value::Str(s)) => descr.replace(s).is_some(),
            ("fortran_order", Value::Bool(b)) => fortran.replace(b).is_some(),
            ("shape", Value::Tuple(t)) => shape.replace(t).is_some(),
            ("descr" | "fortran_order" | "shape", v) => {
                return Err(format!("the header's `{key}` has the wrong type ({})", escape(&format!("{v:?}"), 80)));
            }
            (other, _) => return Err(format!("the header has an unknown key `{}`", escape(other, 40))),
        };
        if slot_taken {
            // A known key (an unknown one was refused above).
            return Err(format!("the header gives `{key}` twice"));
        }
        match p.peek() {
            Some(b',') => p.at += 1,
            Some(b'}') => {}
            _ => return Err("the header dict is not closed with `}`".into()),
        }
    }
    if p.text[p.at..].iter().any(|c| !c.is_ascii_whitespace() && *c != 0) {
        return Err("text after the header dict".into());
    }
    match (descr, fortran, shape) {
        (Some(d), Some(f), Some(s)) => Ok((d, f, s)),
        _ => Err("the header lacks `descr`, `fortran_order` or `shape`".into()),
    }
}

/// Parses the header at the start of `bytes` (which may go on into the data); returns it and
/// the offset of the data.
pub fn parse_header(bytes: &[u8]) -> std::result::Result<(NpyHeader, usize), String> {
    if bytes.len() < 10 && bytes.starts_with(MAGIC) {
        return Err("the file ends inside the header".into());
    }
    if bytes.len() < 10 || &bytes[..6] != MAGIC {
        let start = &bytes[..bytes.len().min(6)];
        return Err(format!(
            "not a .npy file: it starts with {start:02x?}, not the magic \\x93NUMPY (a .npz archive is read with \
             format = \"npz\")"
        ));
    }
    let (len, start) = match bytes[6] {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            let b = bytes.get(8..12).ok_or("the file ends inside the header's length")?;
            (u32::from_le_bytes([b[0], b[1], b[2], b[3]]) as usize, 12)
        }
        v => return Err(format!(".npy format version {v}.{} is not supported (1, 2 and 3 are)", bytes[7])),
    };
    if len > MAX_HEADER_BYTES {
        return Err(format!("the header announces {len} bytes, more than the {MAX_HEADER_BYTES} read"));
    }
    let text = bytes.get(start..start + len).ok_or_else(|| {
        format!("the file ends inside the header ({len} bytes announced, {} there)", bytes.len() - start)
    })?;
    let (descr, fortran_order, dims) = parse_dict(text)?;
    let dtype = parse_descr(&descr)?;
    let elements = dims.iter().try_fold(1u64, |acc, &d| acc.checked_mul(d)).filter(|&n| n <= MAX_ELEMENTS);
    let shape: Vec<usize> = dims.iter().map(|&d| d as usize).collect();
    let elements =
        elements.ok_or_else(|| format!("shape {} announces more than {MAX_ELEMENTS} values", shape_text(&shape)))?;
    let data_bytes = elements * dtype.size as u64;
    if data_bytes > MAX_NPY_BYTES {
        return Err(format!(
            "shape {} of '{descr}' announces {data_bytes} bytes, more than the {MAX_NPY_BYTES} read",
            shape_text(&shape)
        ));
    }
    let header =
        NpyHeader { dtype, fortran_order, shape, elements: elements as usize, data_bytes: data_bytes as usize };
    Ok((header, start + len))
}

/// Reads a whole `.npy` file from `reader`, refusing one whose header announces more than
/// `max_bytes` of data (and at most [`MAX_NPY_BYTES`]); `origin` names it in every error.
pub fn read_npy(mut reader: impl Read, max_bytes: u64, origin: &str) -> Result<NpyArray> {
    let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
    let io = |source| DataError::Io { origin: origin.into(), source };
    let mut head = Vec::with_capacity(12);
    reader.by_ref().take(12).read_to_end(&mut head).map_err(io)?;
    if head.len() < 10 || &head[..6] != MAGIC {
        return Err(fmt(parse_header(&head).err().unwrap_or_else(|| "the file ends inside the header".into())));
    }
    let prefix = if head[6] == 1 { 10 } else { 12 };
    let len = match head[6] {
        1 => u16::from_le_bytes([head[8], head[9]]) as usize,
        _ if head.len() == 12 => u32::from_le_bytes([head[8], head[9], head[10], head[11]]) as usize,
        _ => return Err(fmt("the file ends inside the header's length".into())),
    };
    if len <= MAX_HEADER_BYTES && (head[6] == 1 || head[6] == 2 || head[6] == 3) {
        let want = (prefix + len).saturating_sub(head.len());
        reader.by_ref().take(want as u64).read_to_end(&mut head).map_err(io)?;
    }
    let (header, offset) = parse_header(&head).map_err(fmt)?;
    if header.data_bytes as u64 > max_bytes {
        return Err(fmt(format!(
            "shape {} of '{}' announces {} bytes of data, more than max_bytes = {max_bytes}; raise max_bytes in the \
             data's table if the machine has the memory",
            shape_text(&header.shape),
            header.dtype.descr,
            header.data_bytes
        )));
    }
    // The data already read past the header (a version-1 header read 12 bytes for 10).
    let mut data = head.split_off(offset.min(head.len()));
    let want = header.data_bytes as u64;
    let more = want.saturating_sub(data.len() as u64);
    reader.by_ref().take(more).read_to_end(&mut data).map_err(io)?;
    if (data.len() as u64) < want {
        return Err(fmt(format!(
            "truncated: shape {} of '{}' needs {want} bytes of data, the file has {} after its header",
            shape_text(&header.shape),
            header.dtype.descr,
            data.len()
        )));
    }
    let mut extra = [0u8; 1];
    if data.len() as u64 > want || reader.read(&mut extra).map_err(io)? != 0 {
        return Err(fmt(format!(
            "bytes after the {want} of data that shape {} of '{}' announces: the header's shape is wrong",
            shape_text(&header.shape),
            header.dtype.descr
        )));
    }
    let size = header.dtype.size;
    if header.dtype.big_endian && size > 1 {
        for item in data.chunks_exact_mut(size) {
            item.reverse();
        }
    }
    if header.fortran_order && header.shape.len() > 1 {
        data = fortran_to_c(&data, &header.shape, size);
    }
    let mut dtype = header.dtype;
    dtype.big_endian = false;
    Ok(NpyArray { dtype, shape: header.shape, data })
}

/// Reorders the elements of a Fortran-order (column-major) array into C order.
fn fortran_to_c(data: &[u8], shape: &[usize], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(data.len());
    let mut index = vec![0usize; shape.len()];
    let elements = data.len() / size;
    for _ in 0..elements {
        // Fortran offset: the first index varies fastest.
        let mut offset = 0;
        for d in (0..shape.len()).rev() {
            offset = offset * shape[d] + index[d];
        }
        out.extend_from_slice(&data[offset * size..(offset + 1) * size]);
        // Next C index: the last index varies fastest.
        for d in (0..shape.len()).rev() {
            index[d] += 1;
            if index[d] < shape[d] {
                break;
            }
            index[d] = 0;
        }
    }
    out
}

impl NpyArray {
    /// The values as `f32` features; `uint8` divided by 255 when `scale`. Floats must be finite.
    pub fn features(&self, scale: bool, origin: &str) -> Result<Vec<f32>> {
        let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
        let bytes = &self.data;
        let non_finite = |i: usize| {
            fmt(format!("value {i} (in C order) is not a finite number; features must be finite (replace NaN and inf)"))
        };
        match (self.dtype.kind, self.dtype.size) {
            (Kind::Float, 4) => bytes
                .chunks_exact(4)
                .enumerate()
                .map(|(i, b)| {
                    Some(f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                        .filter(|v| v.is_finite())
                        .ok_or_else(|| non_finite(i))
                })
                .collect(),
            (Kind::Float, 8) => bytes
                .chunks_exact(8)
                .enumerate()
                .map(|(i, b)| {
                    let v = f64::from_le_bytes(b.try_into().unwrap_or([0; 8])) as f32;
                    Some(v).filter(|v| v.is_finite()).ok_or_else(|| non_finite(i))
                })
                .collect(),
            (Kind::Uint, 1) => {
                let k = if scale { 255.0 } else { 1.0 };
                Ok(bytes.iter().map(|&b| b as f32 / k).collect())
            }
            _ => Err(fmt(format!(
                "features of dtype '{}' are not read: use float32, float64 or uint8 (x.astype(np.float32))",
                self.dtype.descr
            ))),
        }
    }

    /// The values as class labels: integers in `0..classes`.
    pub fn labels(&self, classes: usize, origin: &str) -> Result<Vec<u32>> {
        let fmt = |problem: String| DataError::Format { origin: origin.into(), problem };
        if self.dtype.kind == Kind::Float {
            return Err(fmt(format!(
                "labels have dtype '{}'; labels must be integers (save y.astype(np.int64))",
                self.dtype.descr
            )));
        }
        let mut labels = Vec::with_capacity(self.data.len() / self.dtype.size);
        for (i, value) in self.integers().enumerate() {
            match u32::try_from(value).ok().filter(|&l| (l as usize) < classes) {
                Some(l) => labels.push(l),
                None => {
                    return Err(fmt(format!(
                        "label {value} at index {i} is out of range: labels must be class indices 0 to {} \
                         (classes = {classes})",
                        classes.saturating_sub(1)
                    )))
                }
            }
        }
        Ok(labels)
    }

    /// The values of an integer array, widened.
    fn integers(&self) -> impl Iterator<Item = i128> + '_ {
        let size = self.dtype.size;
        let signed = self.dtype.kind == Kind::Int;
        self.data.chunks_exact(size).map(move |b| {
            let mut wide = [0u8; 16];
            wide[..size].copy_from_slice(b);
            if signed && b[size - 1] & 0x80 != 0 {
                wide[size..].fill(0xff);
            }
            i128::from_le_bytes(wide)
        })
    }
}

/// A data set from features `x` (`[n, ...]`) and labels `y` (`[n]` or `[n, 1]`), each named by
/// its origin in errors. `classes` defaults to the largest label + 1 (set it to the
/// federation's number of classes: a client may lack the last ones). `scale` divides `uint8`
/// features by 255.
pub fn dataset_from_npy(
    x: &NpyArray,
    y: &NpyArray,
    classes: Option<usize>,
    scale: bool,
    x_origin: &str,
    y_origin: &str,
) -> Result<Dataset> {
    let fmt = |origin: &str, problem: String| DataError::Format { origin: origin.into(), problem };
    let n = match y.shape.as_slice() {
        [n] | [n, 1] => *n,
        other => {
            return Err(fmt(
                y_origin,
                format!("labels must have shape (n,), got {}; save y.ravel()", shape_text(other)),
            ))
        }
    };
    let (&rows, feature_shape) = x
        .shape
        .split_first()
        .ok_or_else(|| fmt(x_origin, "features are a scalar; they must have shape (n, ...)".into()))?;
    if rows != n {
        return Err(fmt(
            &format!("{x_origin} + {y_origin}"),
            format!("{rows} rows of features ({}) but {n} labels", shape_text(&x.shape)),
        ));
    }
    if n == 0 {
        return Err(fmt(x_origin, "no examples (the arrays have 0 rows)".into()));
    }
    let feature_shape = if feature_shape.is_empty() { vec![1] } else { feature_shape.to_vec() };
    if feature_shape.contains(&0) {
        return Err(fmt(x_origin, format!("features of shape {} have no values", shape_text(&x.shape))));
    }
    let classes = match classes {
        Some(0) => return Err(fmt(y_origin, "classes = 0: a data set needs at least one class".into())),
        Some(c) if c > MAX_CLASSES => {
            return Err(fmt(y_origin, format!("classes = {c}, more than the {MAX_CLASSES} a model head can have")))
        }
        Some(c) => c,
        None if y.dtype.kind == Kind::Float => usize::MAX, // refused by `labels`
        None => match y.integers().max() {
            Some(m) if m >= 0 && (m as u128) < MAX_CLASSES as u128 => m as usize + 1,
            Some(m) if m >= 0 => {
                return Err(fmt(
                    y_origin,
                    format!(
                        "the largest label is {m}, which would make more than the {MAX_CLASSES} classes a model head \
                         can have; labels must be class indices (set classes to their number)"
                    ),
                ))
            }
            _ => 1, // a negative label, refused by `labels`
        },
    };
    let labels = y.labels(classes, y_origin)?;
    let features = x.features(scale, x_origin)?;
    Dataset::new(features, feature_shape, labels, classes).map_err(|e| match e {
        DataError::Format { problem, .. } => fmt(&format!("{x_origin} + {y_origin}"), problem),
        other => other,
    })
}

/// Writes a `.npy` file (version 1, C order, little-endian) of `shape` holding `data`, the
/// little-endian bytes of elements of type `descr` (`<f4`, `<i8`, `|u1`, ...).
pub fn write_npy(descr: &str, shape: &[usize], data: &[u8]) -> Vec<u8> {
    let mut dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {}, }}", shape_text(shape));
    // Pad so that the data start on a multiple of 64 bytes, ending the header with a newline.
    let total = (10 + dict.len() + 1).div_ceil(64) * 64;
    dict.push_str(&" ".repeat(total - 10 - dict.len() - 1));
    dict.push('\n');
    let mut out = Vec::with_capacity(total + data.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&[1, 0]);
    out.extend_from_slice(&(dict.len() as u16).to_le_bytes());
    out.extend_from_slice(dict.as_bytes());
    out.extend_from_slice(data);
    out
}

/// `write_npy` of `f32` values.
pub fn npy_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
    write_npy("<f4", shape, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
}

/// `write_npy` of `i64` values.
pub fn npy_i64(shape: &[usize], values: &[i64]) -> Vec<u8> {
    write_npy("<i8", shape, &values.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<_>>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(bytes: &[u8], origin: &str) -> std::result::Result<NpyArray, String> {
        read_npy(bytes, MAX_NPY_BYTES, origin).map_err(|e| e.to_string())
    }

    /// The error of reading a version-1 file with header `dict` and 8 bytes of data, as "h.npy".
    fn header_error(dict: &str) -> String {
        let mut file = MAGIC.to_vec();
        file.extend_from_slice(&[1, 0]);
        file.extend_from_slice(&(dict.len() as u16).to_le_bytes());
        file.extend_from_slice(dict.as_bytes());
        file.extend_from_slice(&[0; 8]);
        read(&file, "h.npy").unwrap_err()
    }

    #[test]
    fn reads_what_numpy_writes() {
        // np.save of np.arange(6, dtype=np.float32).reshape(2, 3), byte for byte.
        let mut file = b"\x93NUMPY\x01\x00v\x00{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }".to_vec();
        file.resize(10 + 0x76 - 1, b' ');
        file.push(b'\n');
        for v in 0..6 {
            file.extend_from_slice(&(v as f32).to_le_bytes());
        }
        let a = read(&file, "x.npy").unwrap();
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.features(true, "x.npy").unwrap(), vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
        let again = read(&npy_f32(&[2, 3], &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]), "w").unwrap();
        assert_eq!(again, a);
        assert_eq!(npy_f32(&[2, 3], &[0.0; 6]).len() % 64, 24, "data start on a 64-byte boundary");
    }

    #[test]
    fn big_endian_fortran_and_version_2_headers() {
        // [[1, 2, 3], [4, 5, 6]] as big-endian int16 in Fortran order: 1 4 2 5 3 6.
        let data: Vec<u8> = [1i16, 4, 2, 5, 3, 6].iter().flat_map(|v| v.to_be_bytes()).collect();
        let mut file = write_npy(">i2", &[2, 3], &data);
        let text = String::from_utf8_lossy(&file[10..74]).replace("'fortran_order': False", "'fortran_order': True ");
        file.splice(10..74, text.bytes());
        let a = read(&file, "f.npy").unwrap();
        let values: Vec<i16> = a.data.chunks(2).map(|b| i16::from_le_bytes([b[0], b[1]])).collect();
        assert_eq!(values, vec![1, 2, 3, 4, 5, 6]);
        assert_eq!(a.labels(7, "f.npy").unwrap(), vec![1, 2, 3, 4, 5, 6]);
        // Version 2: a 4-byte header length.
        let v1 = npy_i64(&[2], &[0, 1]);
        let mut v2 = b"\x93NUMPY\x02\x00".to_vec();
        v2.extend_from_slice(&u32::from(u16::from_le_bytes([v1[8], v1[9]])).to_le_bytes());
        v2.extend_from_slice(&v1[10..]);
        assert_eq!(read(&v2, "v2.npy").unwrap().labels(2, "v2").unwrap(), vec![0, 1]);
    }

    #[test]
    fn damaged_files_name_the_file_and_the_problem() {
        let good = npy_f32(&[4, 2], &[0.5; 8]);
        // Truncated data: the header claims more than the file has.
        let err = read(&good[..good.len() - 3], "x.npy").unwrap_err();
        assert!(err.contains("x.npy") && err.contains("truncated") && err.contains("(4, 2)"), "{err}");
        // A header that claims far more: read up to what is there, never allocated up front.
        let liar = write_npy("<f4", &[1 << 20, 1 << 9], &[0; 64]);
        let err = read(&liar, "liar.npy").unwrap_err();
        assert!(err.contains("liar.npy") && err.contains("truncated") && err.contains("2147483648"), "{err}");
        let err = read_npy(&good[..], 31, "small.npy").unwrap_err().to_string();
        assert!(err.contains("small.npy") && err.contains("32 bytes") && err.contains("max_bytes = 31"), "{err}");
        let huge = write_npy("<f8", &[1 << 40, 1 << 40], &[]);
        let err = read(&huge, "huge.npy").unwrap_err();
        assert!(err.contains("huge.npy") && err.contains("more than"), "{err}");
        // Bad magic, e.g. a text file, or a .npz given as .npy.
        let err = read(b"hello, this is text", "t.npy").unwrap_err();
        assert!(err.contains("t.npy") && err.contains("magic"), "{err}");
        let err = read(b"PK\x03\x04rest-of-a-zip", "d.npy").unwrap_err();
        assert!(err.contains("npz"), "{err}");
        let err = read(b"\x93NUM", "short.npy").unwrap_err();
        assert!(err.contains("short.npy") && err.contains("magic"), "{err}");
        // The header itself cut short, or announcing too much.
        let err = read(&good[..40], "cut.npy").unwrap_err();
        assert!(err.contains("cut.npy") && err.contains("ends inside the header"), "{err}");
        let mut big = good.clone();
        big[6] = 2;
        big.splice(8..10, [0, 0, 0, 0x7f]);
        let err = read(&big, "big.npy").unwrap_err();
        assert!(err.contains("big.npy") && err.contains("more than the 65536"), "{err}");
        // Trailing bytes: the shape is wrong.
        let mut long = good.clone();
        long.extend_from_slice(&[0; 4]);
        let err = read(&long, "long.npy").unwrap_err();
        assert!(err.contains("long.npy") && err.contains("shape is wrong"), "{err}");
        // Headers that are not what NumPy writes.
        for (dict, problem) in [
            ("{'descr': '<c8', 'fortran_order': False, 'shape': (2,), }", "not supported"),
            ("{'descr': '|O', 'fortran_order': False, 'shape': (2,), }", "object array"),
            ("{'descr': [('a', '<f4')], 'fortran_order': False, 'shape': (2,), }", "structured"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (-2,), }", "non-negative"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (99999999999999999999,), }", "too large"),
            ("{'descr': '<f4', 'fortran_order': False}", "lacks"),
            ("{'descr': '<f4', 'descr': '<f4', 'fortran_order': False, 'shape': (), }", "twice"),
            ("{'descr': '<f4', 'fortran_order': 0, 'shape': (1,), }", "unexpected"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x': True}", "unknown key"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,) ", "not closed"),
            ("{'descr': '<f4, 'fortran_order': False, 'shape': (1,) }", "not closed"),
        ] {
            let err = header_error(dict);
            assert!(err.contains("h.npy") && err.contains(problem), "{dict}: {err}");
        }
    }

    /// A header's text reaches a message escaped: no forged log lines, no terminal escapes.
    #[test]
    fn header_text_in_errors_is_escaped() {
        for (dict, problem) in [
            ("{'descr': '<f4\n\u{1b}[2J', 'fortran_order': False, 'shape': (1,), }", "not a NumPy type string"),
            ("{'descr': '\u{1b}8', 'fortran_order': False, 'shape': (1,), }", "not supported"),
            ("{'descr': '<f4', 'fortran_order': False, 'shape': (1,), 'x\nINFO forged\u{202e}': True}", "unknown key"),
            ("{'descr'\u{1b}[2J: '<f4', 'fortran_order': False, 'shape': (1,), }", "expected `:`"),
        ] {
            let err = header_error(dict);
            assert!(err.contains("h.npy") && err.contains(problem), "{dict}: {err}");
            assert!(!err.contains(['\n', '\u{1b}', '\u{202e}']), "{dict}: {err:?}");
        }
    }

    #[test]
    fn builds_data_sets_and_refuses_bad_labels() {
        let x = read(&write_npy("|u1", &[3, 2, 2], &[0, 255, 51, 0, 1, 2, 3, 4, 5, 6, 7, 8]), "x").unwrap();
        let y = read(&npy_i64(&[3], &[2, 0, 1]), "y").unwrap();
        let ds = dataset_from_npy(&x, &y, None, true, "x.npy", "y.npy").unwrap();
        assert_eq!((ds.feature_shape.clone(), ds.classes, ds.labels.clone()), (vec![2, 2], 3, vec![2, 0, 1]));
        assert_eq!(ds.features[1], 1.0);
        assert_eq!(ds.features[2], 0.2);
        let raw = dataset_from_npy(&x, &y, Some(10), false, "x.npy", "y.npy").unwrap();
        assert_eq!((raw.features[1], raw.classes), (255.0, 10));

        // Labels of the wrong dtype, out of range, negative, of the wrong shape or count.
        let floats = read(&npy_f32(&[3], &[0.0, 1.0, 2.0]), "y").unwrap();
        let err = dataset_from_npy(&x, &floats, None, true, "x.npy", "yf.npy").unwrap_err().to_string();
        assert!(err.contains("yf.npy") && err.contains("'<f4'") && err.contains("integers"), "{err}");
        let err = dataset_from_npy(&x, &y, Some(2), true, "x.npy", "y.npy").unwrap_err().to_string();
        assert!(err.contains("y.npy") && err.contains("label 2 at index 0 is out of range"), "{err}");
        let negative = read(&npy_i64(&[3], &[0, -1, 1]), "y").unwrap();
        let err = dataset_from_npy(&x, &negative, None, true, "x.npy", "yn.npy").unwrap_err().to_string();
        assert!(err.contains("yn.npy") && err.contains("label -1 at index 1"), "{err}");
        let huge = read(&npy_i64(&[3], &[0, 1 << 40, 1]), "y").unwrap();
        let err = dataset_from_npy(&x, &huge, None, true, "x.npy", "yh.npy").unwrap_err().to_string();
        assert!(err.contains("yh.npy") && err.contains("4096"), "{err}");
        let two_d = read(&npy_i64(&[3, 2], &[0; 6]), "y").unwrap();
        let err = dataset_from_npy(&x, &two_d, None, true, "x.npy", "y2.npy").unwrap_err().to_string();
        assert!(err.contains("y2.npy") && err.contains("shape (n,)"), "{err}");
        let short = read(&npy_i64(&[2], &[0, 1]), "y").unwrap();
        let err = dataset_from_npy(&x, &short, None, true, "x.npy", "y.npy").unwrap_err().to_string();
        assert!(err.contains("x.npy + y.npy") && err.contains("3 rows") && err.contains("2 labels"), "{err}");
        // Features of the wrong dtype, or not finite.
        let ints = read(&npy_i64(&[3], &[1, 2, 3]), "x").unwrap();
        let err = dataset_from_npy(&ints, &y, None, true, "xi.npy", "y.npy").unwrap_err().to_string();
        assert!(err.contains("xi.npy") && err.contains("float32"), "{err}");
        let nan = read(&npy_f32(&[3], &[1.0, f32::NAN, 0.0]), "x").unwrap();
        let err = dataset_from_npy(&nan, &y, None, true, "xn.npy", "y.npy").unwrap_err().to_string();
        assert!(err.contains("xn.npy") && err.contains("value 1") && err.contains("finite"), "{err}");
        let err = dataset_from_npy(&x, &y, Some(5000), true, "x.npy", "y.npy").unwrap_err().to_string();
        assert!(err.contains("classes = 5000"), "{err}");
    }
}
