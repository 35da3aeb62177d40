//! SQL functions over the reinforced columns.
//!
//! Embeddings are stored as `fixed_size_list<float16, D>` (one vector) and lists of them (one
//! matrix per row: a row per augmented view, or per text). The functions read float16 values in
//! place and widen them in small stack chunks, so no row is copied to a float32 vector. Vectors
//! may also be float32 or float64, fixed-size or variable lists (e.g. `[0.1, 0.2]` literals).
//!
//! | function | result |
//! |---|---|
//! | `cosine_sim(a, b)` | float32 cosine similarity of two vectors |
//! | `l2_norm(v)` | float32 Euclidean norm |
//! | `view(image_embeddings, i)` | row i of a stored matrix (0 = the original image) |
//! | `caption_embedding(text_embeddings, i)` | row i (0 = alt-text, 1..K = synthetic captions) |
//! | `teacher(v, name)` | one teacher's slice of an ensemble vector, by `recap.teachers` |
//! | `dims(v)` | a vector's length, or a matrix's row count |
//! | `hamming(a, b)` | differing bits of two 64-bit hashes (phash) |
//! | `embed_text(text)` | the teachers' ensemble embedding of a text (runs the teachers' ONNX text towers) |

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arrow::array::{
    Array, ArrayRef, AsArray, FixedSizeListArray, Float16Array, Float32Array, Int32Array, Int64Array, UInt64Array,
};
use arrow::buffer::NullBuffer;
use arrow::datatypes::{DataType, Field, FieldRef, Float16Type, Float32Type, Float64Type, Int64Type, UInt64Type};
use datafusion::common::{exec_err, plan_err, DataFusionError, Result as DfResult, ScalarValue};
use datafusion::logical_expr::{
    ColumnarValue, ReturnFieldArgs, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature, Volatility,
};
use half::f16;
use half::slice::HalfFloatSliceExt;

use crate::train::data::Teacher;

/// Register every function on a session. `teachers` comes from the shards' `recap.teachers`.
pub fn register(ctx: &datafusion::prelude::SessionContext, teachers: &[Teacher]) {
    for f in all(teachers) {
        ctx.register_udf(f);
    }
}

/// Every function, for shards scored by `teachers`.
pub fn all(teachers: &[Teacher]) -> Vec<ScalarUDF> {
    let t = Arc::new(teachers.to_vec());
    vec![
        ScalarUDF::new_from_impl(CosineSim { signature: signature() }),
        ScalarUDF::new_from_impl(L2Norm { signature: signature() }),
        ScalarUDF::new_from_impl(MatrixRow::new("view")),
        ScalarUDF::new_from_impl(MatrixRow::new("caption_embedding")),
        ScalarUDF::new_from_impl(TeacherSlice { teachers: t.clone(), signature: signature() }),
        ScalarUDF::new_from_impl(Dims { signature: signature() }),
        ScalarUDF::new_from_impl(Hamming { signature: signature() }),
        ScalarUDF::new_from_impl(EmbedText::new(t)),
    ]
}

/// What a plan sent to other processes (Ballista's scheduler and executors) carries for one of
/// these functions: a tag and the teachers it was made for, so the receiving side rebuilds the
/// same function without knowing the shards. `None` for a function that is not recap's.
pub fn wire_payload(f: &ScalarUDF) -> Option<Vec<u8>> {
    let any: &dyn std::any::Any = f.inner().as_ref();
    let teachers: &[Teacher] = if let Some(t) = any.downcast_ref::<TeacherSlice>() {
        &t.teachers
    } else if let Some(e) = any.downcast_ref::<EmbedText>() {
        &e.teachers
    } else if any.is::<CosineSim>() || any.is::<L2Norm>() || any.is::<MatrixRow>() || any.is::<Dims>() || any.is::<Hamming>() {
        &[]
    } else {
        return None;
    };
    let mut out = WIRE_TAG.to_vec();
    out.extend(serde_json::to_vec(teachers).ok()?);
    Some(out)
}

const WIRE_TAG: &[u8] = b"recap-udf/1:";

/// The function `wire_payload` described, or `None` when `buf` is not such a payload. An
/// unknown name under recap's tag is an error (a recap of another version sent it).
pub fn from_wire(name: &str, buf: &[u8]) -> Option<DfResult<ScalarUDF>> {
    let json = buf.strip_prefix(WIRE_TAG)?;
    let teachers: Vec<Teacher> = match serde_json::from_slice(json) {
        Ok(t) => t,
        Err(e) => return Some(exec_err!("function {name}: the plan's recap payload is not valid: {e}")),
    };
    Some(
        all(&teachers)
            .into_iter()
            .find(|f| f.name() == name)
            .ok_or_else(|| DataFusionError::Plan(format!("function {name}: not one of this recap's functions (another version sent it?)"))),
    )
}

/// The names, for `\df` and error messages.
pub const FUNCTIONS: [(&str, &str); 8] = [
    ("cosine_sim(a, b)", "cosine similarity of two vectors (float32)"),
    ("l2_norm(v)", "Euclidean norm of a vector (float32)"),
    ("view(image_embeddings, i)", "row i of the view matrix; 0 is the original image"),
    ("caption_embedding(text_embeddings, i)", "row i of the text matrix; 0 is the alt-text, 1..K the synthetic captions"),
    ("teacher(v, 'name')", "one teacher's slice of an ensemble vector (name: model path, its last component, or index)"),
    ("dims(v)", "length of a vector, or rows of a matrix"),
    ("hamming(a, b)", "differing bits of two 64-bit hashes, e.g. phash"),
    ("embed_text('text')", "the teachers' ensemble embedding of a text, comparable with view(image_embeddings, 0)"),
];

// ---------------------------------------------------------------------------------------------
// Reading vectors

/// One row's vector, borrowed from the column.
#[derive(Clone, Copy)]
enum Row<'a> {
    F16(&'a [f16]),
    F32(&'a [f32]),
    F64(&'a [f64]),
}

impl Row<'_> {
    fn len(&self) -> usize {
        match self {
            Row::F16(v) => v.len(),
            Row::F32(v) => v.len(),
            Row::F64(v) => v.len(),
        }
    }

    /// Widen `[start, start + out.len())` into `out`.
    fn chunk(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Row::F16(v) => v[start..end].convert_to_f32_slice(out),
            Row::F32(v) => out.copy_from_slice(&v[start..end]),
            Row::F64(v) => out.iter_mut().zip(&v[start..end]).for_each(|(o, x)| *o = *x as f32),
        }
    }
}

const CHUNK: usize = 64;

/// (a·b, |a|², |b|²), widening both sides in stack chunks.
fn dot_norms(a: Row, b: Row) -> (f32, f32, f32) {
    let n = a.len();
    let (mut ab, mut aa, mut bb) = ([0f32; 8], [0f32; 8], [0f32; 8]);
    let (mut ca, mut cb) = ([0f32; CHUNK], [0f32; CHUNK]);
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        a.chunk(start, &mut ca[..len]);
        b.chunk(start, &mut cb[..len]);
        for (k, (x, y)) in ca[..len].iter().zip(&cb[..len]).enumerate() {
            let l = k & 7;
            ab[l] += x * y;
            aa[l] += x * x;
            bb[l] += y * y;
        }
        start += len;
    }
    (ab.iter().sum(), aa.iter().sum(), bb.iter().sum())
}

fn sq_norm(a: Row) -> f32 {
    let n = a.len();
    let mut acc = [0f32; 8];
    let mut c = [0f32; CHUNK];
    let mut start = 0;
    while start < n {
        let len = CHUNK.min(n - start);
        a.chunk(start, &mut c[..len]);
        for (k, x) in c[..len].iter().enumerate() {
            acc[k & 7] += x * x;
        }
        start += len;
    }
    acc.iter().sum()
}

/// A column of vectors: a fixed-size or variable list of floats, possibly one scalar broadcast.
struct Vectors {
    array: ArrayRef,
    scalar: bool,
}

impl Vectors {
    fn new(arg: &ColumnarValue, what: &str) -> DfResult<Self> {
        let (array, scalar) = one_or_many(arg)?;
        if !is_vector(array.data_type()) {
            return exec_err!("{what}: expected a vector (a list of float16/32/64), got {}", array.data_type());
        }
        Ok(Vectors { array, scalar })
    }

    fn row(&self, i: usize) -> Option<Row<'_>> {
        let i = if self.scalar { 0 } else { i };
        if self.array.is_null(i) {
            return None;
        }
        let (values, start, len): (&ArrayRef, usize, usize) = match self.array.data_type() {
            DataType::FixedSizeList(_, d) => {
                let l = self.array.as_fixed_size_list();
                (l.values(), i * *d as usize, *d as usize)
            }
            DataType::List(_) => {
                let l = self.array.as_list::<i32>();
                let o = l.value_offsets();
                (l.values(), o[i] as usize, (o[i + 1] - o[i]) as usize)
            }
            DataType::LargeList(_) => {
                let l = self.array.as_list::<i64>();
                let o = l.value_offsets();
                (l.values(), o[i] as usize, (o[i + 1] - o[i]) as usize)
            }
            _ => return None,
        };
        Some(match values.data_type() {
            DataType::Float16 => Row::F16(&values.as_primitive::<Float16Type>().values()[start..start + len]),
            DataType::Float32 => Row::F32(&values.as_primitive::<Float32Type>().values()[start..start + len]),
            _ => Row::F64(&values.as_primitive::<Float64Type>().values()[start..start + len]),
        })
    }
}

pub(crate) fn is_float(t: &DataType) -> bool {
    matches!(t, DataType::Float16 | DataType::Float32 | DataType::Float64)
}

/// A list (fixed or not) of floats.
fn is_vector(t: &DataType) -> bool {
    match t {
        DataType::FixedSizeList(f, _) | DataType::List(f) | DataType::LargeList(f) => is_float(f.data_type()),
        _ => false,
    }
}

/// A list of vectors (one matrix per row).
fn is_matrix(t: &DataType) -> bool {
    match t {
        DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => is_vector(f.data_type()),
        _ => false,
    }
}

/// Vector arguments pass as they are; integer-like lists of floats are left alone too.
fn check_vector(name: &str, i: usize, t: &DataType) -> DfResult<DataType> {
    if is_vector(t) || t.is_null() {
        Ok(t.clone())
    } else {
        plan_err!("{name}: argument {} must be a vector (a list of floats such as an embedding column or view(image_embeddings, 0)), got {t}", i + 1)
    }
}

/// Every function here checks its own argument types (`coerce_types`).
fn signature() -> Signature {
    Signature::user_defined(Volatility::Immutable)
}

/// An argument as an array, and whether it was one scalar (a one-row array then, not repeated
/// for every row).
fn one_or_many(arg: &ColumnarValue) -> DfResult<(ArrayRef, bool)> {
    Ok(match arg {
        ColumnarValue::Array(a) => (a.clone(), false),
        ColumnarValue::Scalar(s) => (s.to_array()?, true),
    })
}

fn all_scalar(args: &[ColumnarValue]) -> bool {
    args.iter().all(|a| matches!(a, ColumnarValue::Scalar(_)))
}

/// Return a result array, or a one-row scalar when every argument was scalar.
fn finish(out: ArrayRef, all_scalar: bool) -> DfResult<ColumnarValue> {
    if all_scalar {
        Ok(ColumnarValue::Scalar(ScalarValue::try_from_array(&out, 0)?))
    } else {
        Ok(ColumnarValue::Array(out))
    }
}

macro_rules! impl_eq_hash_by_name {
    ($t:ty) => {
        impl PartialEq for $t {
            fn eq(&self, other: &Self) -> bool {
                self.name() == other.name()
            }
        }
        impl Eq for $t {}
        impl Hash for $t {
            fn hash<H: Hasher>(&self, state: &mut H) {
                self.name().hash(state)
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// cosine_sim, l2_norm

#[derive(Debug)]
struct CosineSim {
    signature: Signature,
}

impl_eq_hash_by_name!(CosineSim);

impl ScalarUDFImpl for CosineSim {
    fn name(&self) -> &str {
        "cosine_sim"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if arg_types.len() != 2 {
            return plan_err!("cosine_sim(a, b) takes two vectors, got {} arguments", arg_types.len());
        }
        arg_types.iter().enumerate().map(|(i, t)| check_vector("cosine_sim", i, t)).collect()
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let a = Vectors::new(&args.args[0], "cosine_sim")?;
        let b = Vectors::new(&args.args[1], "cosine_sim")?;
        let n = args.number_rows;
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            out.push(match (a.row(i), b.row(i)) {
                (Some(x), Some(y)) => {
                    if x.len() != y.len() {
                        return exec_err!("cosine_sim: vectors of {} and {} values (row {i}); compare vectors of one width, e.g. teacher(v, name) of both", x.len(), y.len());
                    }
                    let (ab, aa, bb) = dot_norms(x, y);
                    let d = (aa * bb).sqrt();
                    (d > 0.0).then(|| ab / d)
                }
                _ => None,
            });
        }
        finish(Arc::new(Float32Array::from(out)), all_scalar(&args.args))
    }
}

#[derive(Debug)]
struct L2Norm {
    signature: Signature,
}

impl_eq_hash_by_name!(L2Norm);

impl ScalarUDFImpl for L2Norm {
    fn name(&self) -> &str {
        "l2_norm"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if arg_types.len() != 1 {
            return plan_err!("l2_norm(v) takes one vector, got {} arguments", arg_types.len());
        }
        Ok(vec![check_vector("l2_norm", 0, &arg_types[0])?])
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Float32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let a = Vectors::new(&args.args[0], "l2_norm")?;
        let out: Float32Array = (0..args.number_rows).map(|i| a.row(i).map(|r| sq_norm(r).sqrt())).collect();
        finish(Arc::new(out), all_scalar(&args.args))
    }
}

// ---------------------------------------------------------------------------------------------
// view, caption_embedding

#[derive(Debug)]
struct MatrixRow {
    name: &'static str,
    signature: Signature,
}

impl MatrixRow {
    fn new(name: &'static str) -> Self {
        MatrixRow { name, signature: signature() }
    }
}
impl_eq_hash_by_name!(MatrixRow);

impl ScalarUDFImpl for MatrixRow {
    fn name(&self) -> &str {
        self.name
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        let col = if self.name == "view" { "image_embeddings" } else { "text_embeddings" };
        if arg_types.len() != 2 {
            return plan_err!("{}({col}, i) takes a matrix column and a row index, got {} arguments", self.name, arg_types.len());
        }
        if !is_matrix(&arg_types[0]) {
            return plan_err!("{}: argument 1 must be a list of vectors such as {col}, got {}", self.name, arg_types[0]);
        }
        if !arg_types[1].is_integer() && !arg_types[1].is_null() {
            return plan_err!("{}: argument 2 is a row index (an integer, 0-based), got {}", self.name, arg_types[1]);
        }
        Ok(vec![arg_types[0].clone(), DataType::Int64])
    }
    fn return_type(&self, arg_types: &[DataType]) -> DfResult<DataType> {
        match &arg_types[0] {
            DataType::List(f) | DataType::LargeList(f) | DataType::FixedSizeList(f, _) => Ok(f.data_type().clone()),
            t => plan_err!("{}: not a list of vectors: {t}", self.name),
        }
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let all_scalar = all_scalar(&args.args);
        let n = args.number_rows;
        let (matrix, m_scalar) = one_or_many(&args.args[0])?;
        let index: Int64Array = match &args.args[1] {
            ColumnarValue::Array(a) => a.as_primitive::<Int64Type>().clone(),
            ColumnarValue::Scalar(s) => {
                let v = match s {
                    ScalarValue::Int64(v) => *v,
                    ScalarValue::Null => None,
                    other => return exec_err!("{}: row index {other} is not an integer", self.name),
                };
                Int64Array::from(vec![v; n])
            }
        };
        // (values, start, len) of each row's list.
        let (values, bounds): (ArrayRef, Box<dyn Fn(usize) -> (usize, usize)>) = match matrix.data_type() {
            DataType::List(_) => {
                let l = matrix.as_list::<i32>().clone();
                let o = l.offsets().clone();
                (l.values().clone(), Box::new(move |i| (o[i] as usize, (o[i + 1] - o[i]) as usize)))
            }
            DataType::LargeList(_) => {
                let l = matrix.as_list::<i64>().clone();
                let o = l.offsets().clone();
                (l.values().clone(), Box::new(move |i| (o[i] as usize, (o[i + 1] - o[i]) as usize)))
            }
            DataType::FixedSizeList(_, d) => {
                let d = *d as usize;
                (matrix.as_fixed_size_list().values().clone(), Box::new(move |i| (i * d, d)))
            }
            t => return exec_err!("{}: not a list of vectors: {t}", self.name),
        };
        let take: UInt64Array = (0..n)
            .map(|r| {
                let mr = if m_scalar { 0 } else { r };
                if matrix.is_null(mr) || index.is_null(r) {
                    return None;
                }
                let (start, len) = bounds(mr);
                let i = index.value(r);
                (i >= 0 && (i as usize) < len).then(|| (start + i as usize) as u64)
            })
            .collect();
        let out = arrow::compute::take(values.as_ref(), &take, None)?;
        finish(out, all_scalar)
    }
}

// ---------------------------------------------------------------------------------------------
// teacher

#[derive(Debug)]
struct TeacherSlice {
    teachers: Arc<Vec<Teacher>>,
    signature: Signature,
}
impl_eq_hash_by_name!(TeacherSlice);

impl TeacherSlice {
    /// (offset, width) of the named teacher in the ensemble vector.
    fn locate(&self, name: &str) -> DfResult<(usize, usize)> {
        let mut offset = 0;
        for (i, t) in self.teachers.iter().enumerate() {
            let last = std::path::Path::new(&t.model).file_name().and_then(|n| n.to_str()).unwrap_or("");
            if t.model == name || last == name || i.to_string() == name {
                return Ok((offset, t.dim));
            }
            offset += t.dim;
        }
        if self.teachers.is_empty() {
            return plan_err!("teacher(v, {name:?}): these shards have no recap.teachers metadata (no score stage)");
        }
        let names: Vec<String> = self
            .teachers
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let last = std::path::Path::new(&t.model).file_name().and_then(|n| n.to_str()).unwrap_or(&t.model).to_string();
                format!("{last} (index {i}, {} dims)", t.dim)
            })
            .collect();
        plan_err!("teacher(v, {name:?}): no such teacher; the shards' teachers are {}", names.join(", "))
    }

    fn name_arg(s: Option<&ScalarValue>) -> DfResult<String> {
        match s {
            Some(ScalarValue::Utf8(Some(n)) | ScalarValue::LargeUtf8(Some(n)) | ScalarValue::Utf8View(Some(n))) => Ok(n.clone()),
            Some(ScalarValue::Int64(Some(i))) => Ok(i.to_string()),
            _ => plan_err!("teacher(v, name): name must be a literal string (the teacher's model path or its last component) or index"),
        }
    }
}

impl ScalarUDFImpl for TeacherSlice {
    fn name(&self) -> &str {
        "teacher"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if arg_types.len() != 2 {
            return plan_err!("teacher(v, name) takes a vector and a teacher name, got {} arguments", arg_types.len());
        }
        match &arg_types[0] {
            DataType::FixedSizeList(f, _) if is_float(f.data_type()) => {}
            t => return plan_err!("teacher: argument 1 must be an embedding (fixed-size list of floats), e.g. view(image_embeddings, 0); got {t}"),
        }
        Ok(arg_types.to_vec())
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        plan_err!("teacher: the result type depends on the name")
    }
    fn return_field_from_args(&self, args: ReturnFieldArgs) -> DfResult<FieldRef> {
        let name = Self::name_arg(args.scalar_arguments.get(1).copied().flatten())?;
        let (_, dim) = self.locate(&name)?;
        let DataType::FixedSizeList(item, _) = args.arg_fields[0].data_type() else {
            return plan_err!("teacher: argument 1 must be an embedding");
        };
        Ok(Arc::new(Field::new("teacher", DataType::FixedSizeList(item.clone(), dim as i32), true)))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let name = match &args.args[1] {
            ColumnarValue::Scalar(s) => Self::name_arg(Some(s))?,
            _ => return exec_err!("teacher(v, name): name must be a literal"),
        };
        let (offset, dim) = self.locate(&name)?;
        let (array, scalar) = one_or_many(&args.args[0])?;
        let l = array.as_fixed_size_list();
        let width = l.value_length() as usize;
        if offset + dim > width {
            return exec_err!("teacher({name:?}): the vector has {width} values, fewer than the teachers' widths add up to");
        }
        let rows = if scalar { 1 } else { array.len() };
        let take: UInt64Array =
            (0..rows).flat_map(|r| (0..dim).map(move |k| Some((r * width + offset + k) as u64))).collect();
        let values = arrow::compute::take(l.values().as_ref(), &take, None)?;
        let item = match l.data_type() {
            DataType::FixedSizeList(item, _) => item.clone(),
            _ => unreachable!(),
        };
        let nulls: Option<NullBuffer> = l.nulls().cloned();
        let out = FixedSizeListArray::try_new(item, dim as i32, values, if scalar { None } else { nulls })?;
        finish(Arc::new(out), scalar)
    }
}

// ---------------------------------------------------------------------------------------------
// dims, hamming

#[derive(Debug)]
struct Dims {
    signature: Signature,
}

impl_eq_hash_by_name!(Dims);

impl ScalarUDFImpl for Dims {
    fn name(&self) -> &str {
        "dims"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        match arg_types {
            [t @ (DataType::FixedSizeList(..) | DataType::List(_) | DataType::LargeList(_))] => Ok(vec![t.clone()]),
            _ => plan_err!("dims(v) takes one list (a vector or a matrix column), got {arg_types:?}"),
        }
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let all_scalar = all_scalar(&args.args);
        let a = args.args[0].to_array(args.number_rows)?;
        let out: Int32Array = match a.data_type() {
            DataType::FixedSizeList(_, d) => (0..a.len()).map(|i| a.is_valid(i).then_some(*d)).collect(),
            DataType::List(_) => {
                let l = a.as_list::<i32>();
                (0..a.len()).map(|i| a.is_valid(i).then(|| l.value_length(i))).collect()
            }
            DataType::LargeList(_) => {
                let l = a.as_list::<i64>();
                (0..a.len()).map(|i| a.is_valid(i).then(|| l.value_length(i) as i32)).collect()
            }
            t => return exec_err!("dims: not a list: {t}"),
        };
        finish(Arc::new(out), all_scalar)
    }
}

#[derive(Debug)]
struct Hamming {
    signature: Signature,
}

impl_eq_hash_by_name!(Hamming);

impl ScalarUDFImpl for Hamming {
    fn name(&self) -> &str {
        "hamming"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if arg_types.len() != 2 {
            return plan_err!("hamming(a, b) takes two 64-bit hashes, got {} arguments", arg_types.len());
        }
        for (i, t) in arg_types.iter().enumerate() {
            if !t.is_integer() && !t.is_null() {
                return plan_err!("hamming: argument {} must be an integer hash such as phash, got {t}", i + 1);
            }
        }
        Ok(vec![DataType::UInt64, DataType::UInt64])
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::Int32)
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let all_scalar = all_scalar(&args.args);
        let n = args.number_rows;
        let (a, b) = (args.args[0].to_array(n)?, args.args[1].to_array(n)?);
        let (a, b) = (a.as_primitive::<UInt64Type>(), b.as_primitive::<UInt64Type>());
        let out: Int32Array = (0..n)
            .map(|i| (a.is_valid(i) && b.is_valid(i)).then(|| (a.value(i) ^ b.value(i)).count_ones() as i32))
            .collect();
        finish(Arc::new(out), all_scalar)
    }
}

// ---------------------------------------------------------------------------------------------
// embed_text

/// Runs the shards' teachers (their ONNX text towers, from the paths in `recap.teachers`) on a
/// text and returns the ensemble vector the score stage stores: each teacher's L2-normalised
/// embedding, concatenated, as float16. Models load on first use; results are cached per text.
struct EmbedText {
    teachers: Arc<Vec<Teacher>>,
    signature: Signature,
    state: Mutex<EmbedState>,
}

#[derive(Default)]
struct EmbedState {
    models: Option<Vec<crate::models::clip::Clip>>,
    cache: HashMap<String, Vec<f16>>,
}

impl std::fmt::Debug for EmbedText {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbedText").field("teachers", &self.teachers).finish()
    }
}
impl_eq_hash_by_name!(EmbedText);

impl EmbedText {
    fn new(teachers: Arc<Vec<Teacher>>) -> Self {
        EmbedText { teachers, signature: signature(), state: Mutex::new(EmbedState::default()) }
    }

    fn dim(&self) -> usize {
        self.teachers.iter().map(|t| t.dim).sum()
    }

    fn embed(&self, text: &str) -> DfResult<Vec<f16>> {
        let mut st = self.state.lock().map_err(|_| DataFusionError::Execution("embed_text: lock poisoned".into()))?;
        if let Some(v) = st.cache.get(text) {
            return Ok(v.clone());
        }
        if st.models.is_none() {
            let mut models = Vec::new();
            for t in self.teachers.iter() {
                let path = PathBuf::from(&t.model);
                let clip = crate::models::clip::Clip::load(&path, &Default::default()).map_err(|e| {
                    DataFusionError::Execution(format!(
                        "embed_text: cannot load teacher {} (from the shards' recap.teachers; run recap query where that path resolves): {e}",
                        t.model
                    ))
                })?;
                if clip.dim != t.dim {
                    return exec_err!("embed_text: teacher {} now gives {} dims; the shards were scored with {}", t.model, clip.dim, t.dim);
                }
                models.push(clip);
            }
            st.models = Some(models);
        }
        let mut out = Vec::with_capacity(self.dim());
        for (clip, t) in st.models.as_mut().expect("loaded").iter_mut().zip(self.teachers.iter()) {
            let e = clip.embed_texts(&[text]).map_err(|e| DataFusionError::Execution(format!("embed_text: teacher {}: {e}", t.model)))?;
            out.extend(e.iter().map(|x| f16::from_f32(*x)));
        }
        st.cache.insert(text.to_string(), out.clone());
        Ok(out)
    }
}

impl ScalarUDFImpl for EmbedText {
    fn name(&self) -> &str {
        "embed_text"
    }
    fn signature(&self) -> &Signature {
        &self.signature
    }
    fn coerce_types(&self, arg_types: &[DataType]) -> DfResult<Vec<DataType>> {
        if self.teachers.is_empty() {
            return plan_err!("embed_text: these shards have no recap.teachers metadata (no score stage), so there is no teacher to run");
        }
        match arg_types {
            [t] if matches!(t, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View) => Ok(vec![DataType::Utf8]),
            _ => plan_err!("embed_text(text) takes one string, got {arg_types:?}"),
        }
    }
    fn return_type(&self, _: &[DataType]) -> DfResult<DataType> {
        Ok(DataType::FixedSizeList(Arc::new(Field::new("item", DataType::Float16, false)), self.dim() as i32))
    }
    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> DfResult<ColumnarValue> {
        let all_scalar = all_scalar(&args.args);
        let (texts, _) = one_or_many(&args.args[0])?;
        let texts = arrow::compute::cast(&texts, &DataType::Utf8)?;
        let texts = texts.as_string::<i32>();
        let d = self.dim();
        let mut values: Vec<f16> = Vec::with_capacity(texts.len() * d);
        for i in 0..texts.len() {
            if texts.is_valid(i) {
                values.extend(self.embed(texts.value(i))?);
            } else {
                values.extend(std::iter::repeat_n(f16::ZERO, d));
            }
        }
        let out = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float16, false)),
            d as i32,
            Arc::new(Float16Array::from(values)),
            texts.nulls().cloned(),
        )?;
        finish(Arc::new(out), all_scalar)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dot_norms_widen_float16_in_chunks() {
        let a: Vec<f16> = (0..150).map(|i| f16::from_f32((i as f32 * 0.37).sin())).collect();
        let b: Vec<f32> = (0..150).map(|i| (i as f32 * 0.11).cos()).collect();
        let (ab, aa, bb) = dot_norms(Row::F16(&a), Row::F32(&b));
        let af: Vec<f64> = a.iter().map(|x| x.to_f64()).collect();
        let want_ab: f64 = af.iter().zip(&b).map(|(x, y)| x * *y as f64).sum();
        let want_aa: f64 = af.iter().map(|x| x * x).sum();
        let want_bb: f64 = b.iter().map(|y| (*y as f64).powi(2)).sum();
        assert!((ab as f64 - want_ab).abs() < 1e-4, "{ab} vs {want_ab}");
        assert!((aa as f64 - want_aa).abs() < 1e-4);
        assert!((bb as f64 - want_bb).abs() < 1e-4);
        assert!((sq_norm(Row::F16(&a)) as f64 - want_aa).abs() < 1e-4);
    }
}
