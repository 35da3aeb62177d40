// 2026-12-08: could a hand-written entropy decoder lift the photo web past 4x img2dataset?
//
// Setup: 200 photo-like JPEGs (`recap synth --out /tmp/photo200 --count 200 --seed 3 --photo
// --min-size 640x480 --max-size 2048x1536 --png-fraction 0 --corrupt 0`: 71.8 MB, 359 KB and
// 71,198 8x8 blocks per image on average), one thread, release build of 03cc200, 2-core VM.
//
// The same files, ms per image (rounds vary 10-20% on this VM):
//   Pillow 12.0.0 (libjpeg-turbo 3.1.2) full decode 7.0-7.5; draft (scaled IDCT, as recap) 4.7-4.8
//   recap's libjpeg-turbo (mozjpeg-sys) 8/8: 6.4-7.5; 4/8: 5.0-6.0; 1/8 (DC only): 3.8-4.5
//   recap::imaging::process at size 256 (decode, resize, encode, phash): 5.0-6.6
//   This prototype, walking the entropy data keeping only DC (the least a 1/8 decode must do):
//   2.9-3.4 against libjpeg-turbo's 3.8-4.8 in the same rounds: 1.2-1.3x.
//   Per image it decodes ~516,000 AC symbols through the 12-bit "skip" table (code and magnitude
//   bits in one look-up) and ~6,000 through the slow path: ~5 ns a symbol.
//
// Reading: libjpeg-turbo's Huffman decoding is near what a straightforward table decoder does.
// A run spends ~6 ms of core time per photo (324-339 images/s on 2 cores, 2.8-2.9x img2dataset),
// ~3.8 of it in entropy decoding: 1.25x faster there gives ~3.2x img2dataset, 1.5x (multi-symbol
// tables) ~3.6x, and 4x needs about 2x. Not pursued:
// a JPEG decoder of our own in the hot path is a large correctness and fuzzing liability for a
// gain that does not reach the target.
//
// Run: copy to examples/skip_proto.rs and `cargo run --release --no-default-features --example skip_proto`.
// Prototype: how fast can baseline JPEG entropy data be walked keeping only DC values?
use std::time::Instant;

struct Huff { lut: Vec<u16>, // index: next LUT bits -> (len<<8)|sym for codes <= LUT bits, 0 if longer
    maxcode: [i32; 18], valptr: [i32; 17], mincode: [i32; 17], vals: Vec<u8>,
    skip: Vec<u16>, // AC: next SKIP bits -> (total bits << 8) | advance (1..=16, 64 = EOB), 0 = slow
}
const LUT: u32 = 9; const SKIP: u32 = 12;
impl Huff {
    fn new(counts: &[u8; 16], vals: &[u8]) -> Huff {
        let mut lut = vec![0u16; 1 << LUT]; let mut skip = vec![0u16; 1 << SKIP];
        let (mut maxcode, mut valptr, mut mincode) = ([-1i32; 18], [0i32; 17], [0i32; 17]);
        let mut code = 0i32; let mut k = 0usize;
        for l in 1..=16usize {
            let n = counts[l - 1] as usize;
            valptr[l] = k as i32; mincode[l] = code;
            for _ in 0..n {
                let sym = vals[k];
                if l as u32 <= LUT { let sh = LUT - l as u32; for f in 0..(1 << sh) { lut[((code as usize) << sh) | f] = ((l as u16) << 8) | sym as u16; } }
                let s = (sym & 15) as u32; let r = (sym >> 4) as u16;
                let total = l as u32 + s;
                if total <= SKIP { let adv = if s == 0 && r != 15 { 64 } else { r + 1 }; let sh = SKIP - total;
                    // every suffix of magnitude bits, every filler
                    let base = (code as usize) << (SKIP - l as u32);
                    for f in 0..(1usize << (SKIP - l as u32)) { let _ = sh; skip[base | f] = ((total as u16) << 8) | adv; } }
                code += 1; k += 1;
            }
            maxcode[l] = if n > 0 { code - 1 } else { -1 };
            code <<= 1;
        }
        maxcode[17] = i32::MAX;
        Huff { lut, maxcode, valptr, mincode, vals: vals.to_vec(), skip }
    }
}
struct Bits<'a> { d: &'a [u8], pos: usize, buf: u64, n: u32, marker: bool }
impl<'a> Bits<'a> {
    #[inline(always)] fn refill(&mut self) {
        if self.n > 55 { return; }
        if !self.marker && self.pos + 8 <= self.d.len() {
            let w = u64::from_be_bytes(self.d[self.pos..self.pos + 8].try_into().unwrap());
            let x = !w;
            if (x.wrapping_sub(0x0101010101010101)) & !x & 0x8080808080808080 == 0 {
                let take = (63 - self.n) / 8;
                self.buf |= (w >> (64 - take * 8)) << (64 - self.n - take * 8);
                self.pos += take as usize; self.n += take * 8;
                return;
            }
        }
        while self.n <= 56 {
            let b = if self.marker || self.pos >= self.d.len() { 0 } else {
                let b = self.d[self.pos];
                if b == 0xFF { let nx = *self.d.get(self.pos + 1).unwrap_or(&0); if nx == 0 { self.pos += 2; 0xFF } else { self.marker = true; 0 } } else { self.pos += 1; b } };
            self.buf |= (b as u64) << (56 - self.n); self.n += 8;
        }
    }
    #[inline(always)] fn peek(&self, k: u32) -> usize { (self.buf >> (64 - k)) as usize }
    #[inline(always)] fn drop(&mut self, k: u32) { self.buf <<= k; self.n -= k; }
}
#[inline(always)]
fn decode_sym(b: &mut Bits, h: &Huff) -> u8 {
    let e = h.lut[b.peek(LUT)];
    if e != 0 { b.drop((e >> 8) as u32); return e as u8; }
    let mut l = LUT as usize + 1;
    loop { let code = b.peek(l as u32) as i32; if code <= h.maxcode[l] || l >= 16 { b.drop(l as u32); let i = h.valptr[l] + code - h.mincode[l]; return *h.vals.get(i as usize).unwrap_or(&0); } l += 1; }
}
fn parse(d: &[u8]) -> Option<(Vec<(u8,u8,u8,u8,u8)>, [Option<Huff>;4], [Option<Huff>;4], usize, usize, usize, u32, u32)> {
    let mut i = 2; let mut comps = vec![]; let mut dc: [Option<Huff>;4] = Default::default(); let mut ac: [Option<Huff>;4] = Default::default();
    let (mut w, mut h) = (0, 0); let mut ri = 0usize;
    while i + 4 <= d.len() {
        if d[i] != 0xFF { return None; }
        let m = d[i + 1]; let len = u16::from_be_bytes([d[i + 2], d[i + 3]]) as usize; let seg = &d[i + 4..i + 2 + len];
        match m {
            0xC0 | 0xC1 => { h = u16::from_be_bytes([seg[1], seg[2]]) as u32; w = u16::from_be_bytes([seg[3], seg[4]]) as u32;
                for c in 0..seg[5] as usize { let o = 6 + c * 3; comps.push((seg[o], seg[o+1] >> 4, seg[o+1] & 15, 0, 0)); } }
            0xC4 => { let mut o = 0; while o < seg.len() { let tc = seg[o] >> 4; let th = (seg[o] & 15) as usize; let counts: [u8;16] = seg[o+1..o+17].try_into().ok()?; let n: usize = counts.iter().map(|&c| c as usize).sum(); let hf = Huff::new(&counts, &seg[o+17..o+17+n]); if tc == 0 { dc[th] = Some(hf) } else { ac[th] = Some(hf) }; o += 17 + n; } }
            0xDD => { ri = u16::from_be_bytes([seg[0], seg[1]]) as usize; }
            0xDA => { let ns = seg[0] as usize; for k in 0..ns { let id = seg[1 + k*2]; let t = seg[2 + k*2]; for c in comps.iter_mut() { if c.0 == id { c.3 = t >> 4; c.4 = t & 15; } } }
                return Some((comps, dc, ac, i + 2 + len, ri, 0, w, h)); }
            0xC2 => return None,
            _ => {}
        }
        i += 2 + len;
    }
    None
}
static mut FAST: u64 = 0; static mut SLOW: u64 = 0; static mut BLOCKS: u64 = 0;
fn walk(d: &[u8]) -> i64 {
    let (comps, dc, ac, start, _ri, _, w, h) = parse(d).unwrap();
    let hmax = comps.iter().map(|c| c.1).max().unwrap() as u32; let vmax = comps.iter().map(|c| c.2).max().unwrap() as u32;
    let mcux = w.div_ceil(8 * hmax); let mcuy = h.div_ceil(8 * vmax);
    let mut b = Bits { d: &d[start..], pos: 0, buf: 0, n: 0, marker: false };
    let mut pred = [0i32; 4]; let mut sum = 0i64;
    for _ in 0..mcux * mcuy {
        for (ci, c) in comps.iter().enumerate() {
            let (dct, act) = (dc[c.3 as usize].as_ref().unwrap(), ac[c.4 as usize].as_ref().unwrap());
            for _ in 0..(c.1 as u32 * c.2 as u32) {
                b.refill();
                let s = decode_sym(&mut b, dct) as u32;
                let v = if s > 0 { let r = b.peek(s) as i32; b.drop(s); if r < (1 << (s - 1)) { r - (1 << s) + 1 } else { r } } else { 0 };
                pred[ci] += v; unsafe { BLOCKS += 1; } sum += pred[ci] as i64;
                let mut k = 1u32;
                while k < 64 {
                    if b.n < 32 { b.refill(); }
                    let e = act.skip[b.peek(SKIP)];
                    if e != 0 { unsafe { FAST += 1; } b.drop((e >> 8) as u32); k += (e & 0xFF) as u32; continue; }
                    unsafe { SLOW += 1; }
                    if b.n < 32 { b.refill(); }
                    let sym = decode_sym(&mut b, act); let s = (sym & 15) as u32; let r = (sym >> 4) as u32;
                    if s == 0 { if r != 15 { break; } k += 16; continue; }
                    if b.n < 16 { b.refill(); }
                    b.drop(s); k += r + 1;
                }
            }
        }
    }
    if b.marker || b.pos + 2 < b.d.len() { } else { eprintln!("walk did not reach the end marker: pos {} of {}", b.pos, b.d.len()); }
    sum
}
fn main() {
    let mut files: Vec<_> = std::fs::read_dir("/tmp/photo200/images").unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let data: Vec<Vec<u8>> = files.iter().map(|f| std::fs::read(f).unwrap()).collect();
    for d in &data { walk(d); }
    unsafe { println!("per image: blocks {} fast {} slow {}", BLOCKS / 200, FAST / 200, SLOW / 200); }
    for round in 0..3 {
        let t = Instant::now(); let mut s = 0; for d in &data { s += walk(d); }
        println!("round {round} proto DC-only walk: {:.2} ms/image ({s})", t.elapsed().as_secs_f64() * 1e3 / data.len() as f64);
        let t = Instant::now();
        for d in &data { recap::imaging::jpeg::decode_scaled(d, 1).unwrap(); }
        println!("round {round} libjpeg 1/8: {:.2} ms/image", t.elapsed().as_secs_f64() * 1e3 / data.len() as f64);
    }
}
