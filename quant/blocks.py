"""Numpy reference codecs of ggml's 4-6 bit block formats.

`quantize_*` are the plain round-to-nearest encoders (RTN): for the legacy types (Q4_0, Q4_1, Q5_0,
Q5_1) they give ggml's reference bytes; for K-quants they give what the C++ core's `Fit.RTN` gives,
bit for bit. The importance-weighted search lives in C++ only (`edgeai._native.quantize_rows`)
and is checked against these decoders. Every array is `(n_blocks, block_size)` float32 in,
`(n_blocks, type_size)` uint8 out, or the reverse.
"""

from __future__ import annotations

import numpy as np

QK = 32
QK_K = 256


def round_half_away(x: np.ndarray) -> np.ndarray:
    """Round to nearest, ties away from zero (C's roundf, which ggml uses), in x's dtype."""
    # floor(|x| + 0.5) would be wrong just below .5 (the sum rounds up); this form is exact.
    a = np.abs(x)
    whole = np.floor(a)
    return np.sign(x) * (whole + np.floor(2 * (a - whole)))


def _f16_bytes(v: np.ndarray) -> np.ndarray:
    """(n, 1) float32 -> (n, 2) uint8 of the fp16 encoding."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).reshape(-1, 1).view(np.uint8)


def _f16_value(v: np.ndarray) -> np.ndarray:
    """float32 rounded through fp16, as the decoder will see it."""
    with np.errstate(over="ignore"):
        return v.astype(np.float16).astype(np.float32)


def _f16_field(blocks: np.ndarray, start: int) -> np.ndarray:
    """(n, 1) float32 decoded from the fp16 at byte `start` of each block."""
    return blocks[:, start:start + 2].copy().view(np.float16).astype(np.float32)


def _pack_nibbles(q: np.ndarray) -> np.ndarray:
    """(n, 32) codes -> (n, 16) bytes: element j in the low nibble, j+16 in the high nibble."""
    q = q.astype(np.uint8)
    return (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)


def _unpack_nibbles(qs: np.ndarray) -> np.ndarray:
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.int32)


def _pack_high_bits(q: np.ndarray) -> np.ndarray:
    """(n, 32) 5-bit codes -> (n, 4) bytes: bit j of a little-endian uint32 is bit 4 of code j."""
    bits = ((q.astype(np.uint32) >> 4) & 1) << np.arange(32, dtype=np.uint32)
    return bits.sum(axis=1, dtype=np.uint32).reshape(-1, 1).view(np.uint8)


def _unpack_high_bits(qh: np.ndarray) -> np.ndarray:
    word = qh.copy().view(np.uint32)  # (n, 1)
    return ((word >> np.arange(32, dtype=np.uint32)) & 1).astype(np.int32)


# ---- Q4_0 / Q5_0: x = d * (q - 2^(b-1)) ----------------------------------------------------------
def _symmetric_codes(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    d = np.take_along_axis(blocks, imax, axis=1) / np.float32(-nmax)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc(blocks * inv_d + np.float32(nmax + 0.5)), 2 * nmax - 1).astype(np.int32)
    return d, q


def quantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _symmetric_codes(blocks, 8)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(q)], axis=1)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    return _f16_field(blocks, 0) * (_unpack_nibbles(blocks[:, 2:]) - 8).astype(np.float32)


def quantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    d, q = _symmetric_codes(blocks, 16)
    return np.concatenate([_f16_bytes(d), _pack_high_bits(q), _pack_nibbles(q)], axis=1)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _unpack_nibbles(blocks[:, 6:]) | (_unpack_high_bits(blocks[:, 2:6]) << 4)
    return _f16_field(blocks, 0) * (q - 16).astype(np.float32)


# ---- Q4_1 / Q5_1: x = d * q + m --------------------------------------------------------------------
def _affine_codes(blocks: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo = blocks.min(axis=1, keepdims=True)
    hi = blocks.max(axis=1, keepdims=True)
    d = (hi - lo) / np.float32(nmax)
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    q = np.minimum(np.trunc((blocks - lo) * inv_d + np.float32(0.5)), nmax).astype(np.int32)
    return d, lo, q


def quantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _affine_codes(blocks, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_nibbles(q)], axis=1)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    return _f16_field(blocks, 0) * _unpack_nibbles(blocks[:, 4:]).astype(np.float32) + _f16_field(blocks, 2)


def quantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    d, m, q = _affine_codes(blocks, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(m), _pack_high_bits(q), _pack_nibbles(q)], axis=1)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    q = _unpack_nibbles(blocks[:, 8:]) | (_unpack_high_bits(blocks[:, 4:8]) << 4)
    return _f16_field(blocks, 0) * q.astype(np.float32) + _f16_field(blocks, 2)


# ---- Q4_K / Q5_K: 8 sub-blocks of 32; x = d*sc*q - dmin*mn; sc, mn 6-bit --------------------------
def _kquant_affine(blocks: np.ndarray, nmax: int):
    sub = blocks.reshape(-1, 8, QK)  # [n, 8, 32]
    lo = np.minimum(sub.min(axis=2), np.float32(0))  # offsets are <= 0: stored as a subtracted min
    hi = sub.max(axis=2)
    scale = (hi - lo) / np.float32(nmax)  # [n, 8]
    mins = np.float32(0) - lo  # not -lo: a -0.0 would survive max() and flip the sign bit of dmin
    d = _f16_value(scale.max(axis=1, keepdims=True) / np.float32(63))  # [n, 1]
    dmin = _f16_value(mins.max(axis=1, keepdims=True) / np.float32(63))
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d > 0, np.minimum(63, round_half_away(scale / d)), 0).astype(np.int32)
        mn = np.where(dmin > 0, np.minimum(63, round_half_away(mins / dmin)), 0).astype(np.int32)
        ds = (d * sc.astype(np.float32))[:, :, None]  # [n, 8, 1]
        dm = (dmin * mn.astype(np.float32))[:, :, None]
        q = np.where(ds > 0, np.clip(round_half_away((sub + dm) / ds), 0, nmax), 0).astype(np.int32)
    return d, dmin, sc, mn, q.reshape(-1, QK_K)


def _pack_kscales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """6-bit scales and mins of 8 sub-blocks -> 12 bytes (ggml's packing)."""
    out = np.empty((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    out[:, 4:8] = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:] & 15) | ((mn[:, 4:] & 15) << 4)
    return out


def _unpack_kscales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    s = s.astype(np.int32)
    sc = np.concatenate([s[:, 0:4] & 63, (s[:, 8:12] & 15) | ((s[:, 0:4] >> 6) << 4)], axis=1)
    mn = np.concatenate([s[:, 4:8] & 63, (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)], axis=1)
    return sc, mn


def _pack_k_low(q: np.ndarray) -> np.ndarray:
    """[n, 256] codes -> [n, 128]: 32-byte chunk c holds sub-block 2c (low) and 2c+1 (high nibbles)."""
    sub = q.reshape(-1, 4, 2, QK).astype(np.uint8)
    return ((sub[:, :, 0] & 15) | ((sub[:, :, 1] & 15) << 4)).reshape(-1, 128)


def _unpack_k_low(ql: np.ndarray) -> np.ndarray:
    chunks = ql.reshape(-1, 4, 1, QK).astype(np.int32)
    return ((chunks >> np.array([0, 4]).reshape(1, 1, 2, 1)) & 15).reshape(-1, QK_K)


def quantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _kquant_affine(blocks, 15)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_kscales(sc, mn), _pack_k_low(q)], axis=1)


def _kquant_decode(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    d, dmin = _f16_field(blocks, 0), _f16_field(blocks, 2)
    sc, mn = _unpack_kscales(blocks[:, 4:16])
    ds = (d * sc.astype(np.float32))[:, :, None]
    dm = (dmin * mn.astype(np.float32))[:, :, None]
    return (ds * q.reshape(-1, 8, QK).astype(np.float32) - dm).reshape(-1, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _kquant_decode(blocks, _unpack_k_low(blocks[:, 16:]))


def quantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, dmin, sc, mn, q = _kquant_affine(blocks, 31)
    return np.concatenate([_f16_bytes(d), _f16_bytes(dmin), _pack_kscales(sc, mn), _pack_k_high(q), _pack_k_low(q)], axis=1)


def _pack_k_high(q: np.ndarray) -> np.ndarray:
    """[n, 256] 5-bit codes -> [n, 32]: bit j of byte l is bit 4 of element l of sub-block j."""
    high = ((q.reshape(-1, 8, QK) >> 4) & 1).astype(np.uint8) << np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    return high.sum(axis=1, dtype=np.uint8)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    qh = blocks[:, 16:48].astype(np.int32)[:, None, :]  # [n, 1, 32]
    high = ((qh >> np.arange(8).reshape(1, 8, 1)) & 1).reshape(-1, QK_K)
    return _kquant_decode(blocks, _unpack_k_low(blocks[:, 48:]) | (high << 4))


# ---- Q6_K: 16 sub-blocks of 16; x = d * sc * (q - 32); sc int8 ---------------------------------------
def _q6_k_positions() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """For each of the 256 weights: its ql byte, ql shift, qh byte and qh shift (ggml's layout)."""
    i = np.arange(QK_K)
    g, pos = i // 32, i % 32
    h, s, b = g // 4, (g % 4) // 2, (g % 2) * 32 + pos
    return h * 64 + b, 4 * s, h * 32 + pos, 2 * (g % 4)


_Q6_POS = _q6_k_positions()


def quantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    sub = blocks.reshape(-1, 16, 16)
    imax = np.abs(sub).argmax(axis=2)[:, :, None]
    scale = (np.take_along_axis(sub, imax, axis=2) / np.float32(-32))[:, :, 0]  # [n, 16]
    jmax = np.abs(scale).argmax(axis=1)[:, None]
    max_scale = np.take_along_axis(scale, jmax, axis=1)  # [n, 1]
    d = np.where(max_scale != 0, _f16_value(max_scale / np.float32(-128)), np.float32(0)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d != 0, np.clip(round_half_away(scale / d), -128, 127), 0).astype(np.int32)
        ds = (d * sc.astype(np.float32))[:, :, None]
        q = np.where(ds != 0, np.clip(round_half_away(sub / ds), -32, 31), 0).astype(np.int32).reshape(-1, QK_K) + 32
    return np.concatenate([_pack_q6_k_codes(q), sc.astype(np.int8).view(np.uint8), _f16_bytes(d)], axis=1)


def _pack_q6_k_codes(q: np.ndarray) -> np.ndarray:
    """[n, 256] codes in [0, 64) -> [n, 192]: ql (low 4 bits) then qh (high 2 bits), ggml's layout."""
    ql_byte, ql_shift, qh_byte, qh_shift = _Q6_POS
    ql = np.zeros((q.shape[0], 128), np.uint8)
    qh = np.zeros((q.shape[0], 64), np.uint8)
    # each byte receives two (ql) or four (qh) disjoint bit fields: OR them in one shift at a time
    for shift in (0, 4):
        sel = ql_shift == shift
        ql[:, ql_byte[sel]] |= ((q[:, sel] & 15) << shift).astype(np.uint8)
    for shift in (0, 2, 4, 6):
        sel = qh_shift == shift
        qh[:, qh_byte[sel]] |= ((q[:, sel] >> 4) << shift).astype(np.uint8)
    return np.concatenate([ql, qh], axis=1)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql_byte, ql_shift, qh_byte, qh_shift = _Q6_POS
    ql, qh = blocks[:, :128].astype(np.int32), blocks[:, 128:192].astype(np.int32)
    q = ((ql[:, ql_byte] >> ql_shift) & 15) | (((qh[:, qh_byte] >> qh_shift) & 3) << 4)
    sc = blocks[:, 192:208].view(np.int8).astype(np.float32)
    d = _f16_field(blocks, 208)
    return (d * np.repeat(sc, 16, axis=1)) * (q - 32).astype(np.float32)


# ---- block grids and code packing (GPTQ picks codes one column at a time on a frozen grid) ----
# Every format here decodes a sub-block as offset + scale * k for integer codes k in [0, levels).


def block_grid(name: str, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The value grid of each sub-block of encoded blocks `raw` [n_blocks, type_size].

    Returns (scale [n_blocks, n_sub], offset [n_blocks, n_sub], levels, sub_size): sub-block s of
    block b can hold exactly offset[b, s] + scale[b, s] * k for k in range(levels).
    """
    if name in ("q4_0", "q5_0", "q8_0"):
        d = _f16_field(raw, 0)
        half = {"q4_0": 8, "q5_0": 16, "q8_0": 128}[name]
        return d, -half * d, 2 * half, QK
    if name in ("q4_1", "q5_1"):
        return _f16_field(raw, 0), _f16_field(raw, 2), 16 if name == "q4_1" else 32, QK
    if name in ("q4_k", "q5_k"):
        d, dmin = _f16_field(raw, 0), _f16_field(raw, 2)
        sc, mn = _unpack_kscales(raw[:, 4:16])
        return d * sc.astype(np.float32), -(dmin * mn.astype(np.float32)), 16 if name == "q4_k" else 32, QK
    if name == "q6_k":
        scale = _f16_field(raw, 208) * raw[:, 192:208].view(np.int8).astype(np.float32)
        return scale, -32 * scale, 64, 16
    raise ValueError(f"no grid for {name}")


def pack_codes(name: str, raw: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A copy of `raw` [n_blocks, type_size] whose codes are replaced by `codes` [n_blocks, block_size]
    (integers in [0, levels) of `block_grid`); scales are kept."""
    out = raw.copy()
    q = codes.astype(np.int32)
    if name == "q8_0":
        out[:, 2:] = (q - 128).astype(np.int8).view(np.uint8)
    elif name in ("q4_0", "q4_1"):
        start = 2 if name == "q4_0" else 4
        out[:, start:start + 16] = _pack_nibbles(q)
    elif name in ("q5_0", "q5_1"):
        start = 2 if name == "q5_0" else 4
        out[:, start:start + 4] = _pack_high_bits(q)
        out[:, start + 4:start + 20] = _pack_nibbles(q)
    elif name == "q4_k":
        out[:, 16:] = _pack_k_low(q)
    elif name == "q5_k":
        out[:, 16:48] = _pack_k_high(q)
        out[:, 48:] = _pack_k_low(q)
    elif name == "q6_k":
        out[:, :192] = _pack_q6_k_codes(q)
    else:
        raise ValueError(f"no codes to pack for {name}")
    return out


# ---- IQ4_NL / IQ4_XS: x = d * KVALUES[q], a non-uniform 4-bit grid ------------------------------------
# RTN: the largest magnitude maps to the grid's end (-127), each value to its nearest grid point
# (ties: the lower one). IQ4_XS adds 6-bit sub-block scales under one fp16 d per 256.
IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], np.float32)


def _nearest_kvalue(v: np.ndarray) -> np.ndarray:
    """Index of the nearest IQ4 grid point of each value (ties: the lower index)."""
    return np.abs(v[..., None] - IQ4_KVALUES).argmin(axis=-1).astype(np.int32)


def _iq4_block_scale(blocks: np.ndarray) -> np.ndarray:
    """(n, k) -> (n, 1): the scale that puts each block's largest magnitude on -127."""
    imax = np.abs(blocks).argmax(axis=1)[:, None]
    return np.take_along_axis(blocks, imax, axis=1) / np.float32(-127)


def _iq4_codes(blocks: np.ndarray, d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    return _nearest_kvalue((blocks * inv_d).astype(np.float32))


def quantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = _iq4_block_scale(blocks)
    return np.concatenate([_f16_bytes(d), _pack_nibbles(_iq4_codes(blocks, d))], axis=1)


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    return _f16_field(blocks, 0) * IQ4_KVALUES[_unpack_nibbles(blocks[:, 2:])]


def quantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    # (n, 256) -> (n, 136): fp16 d, uint16 scales_h (2 high bits of each 6-bit scale), 4 bytes
    # scales_l (low nibbles, sub-block 2j in the low half of byte j), then 8 x 16 bytes of nibbles
    n = blocks.shape[0]
    sub = blocks.reshape(n * 8, QK)
    scales = _iq4_block_scale(sub).reshape(n, 8)  # [n, 8]
    imax = np.abs(scales).argmax(axis=1)[:, None]
    d = np.take_along_axis(scales, imax, axis=1) / np.float32(-32)  # [n, 1]
    with np.errstate(divide="ignore"):
        inv_d = np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)
    ls = np.clip(round_half_away(inv_d * scales), -32, 31).astype(np.int32)  # [n, 8]
    dl = (_f16_value(d) * ls).astype(np.float32)
    codes = _iq4_codes(sub, dl.reshape(-1, 1)).reshape(n * 8, QK)
    u = (ls + 32).astype(np.uint32)
    scales_h = ((u >> 4) << (2 * np.arange(8, dtype=np.uint32))).sum(axis=1, dtype=np.uint32).astype(np.uint16)
    scales_l = ((u[:, 0::2] & 15) | ((u[:, 1::2] & 15) << 4)).astype(np.uint8)  # [n, 4]
    qs = _pack_nibbles(codes).reshape(n, 128)
    return np.concatenate([_f16_bytes(d), scales_h.reshape(-1, 1).view(np.uint8), scales_l, qs], axis=1)


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    d = _f16_field(blocks, 0)  # [n, 1]
    scales_h = blocks[:, 2:4].copy().view(np.uint16).astype(np.int32)  # [n, 1]
    low = blocks[:, 4:8].astype(np.int32)
    scales_l = np.stack([low & 15, low >> 4], axis=2).reshape(n, 8)
    ls = scales_l | (((scales_h >> (2 * np.arange(8))) & 3) << 4)
    dl = d * (ls - 32).astype(np.float32)  # [n, 8]
    codes = _unpack_nibbles(blocks[:, 8:].reshape(n * 8, 16))  # [n*8, 32]
    return (dl.reshape(n * 8, 1) * IQ4_KVALUES[codes]).reshape(n, QK_K)


# ---- MXFP4: x = 2^(e-128) * E2M1_DOUBLED[q], one E8M0 exponent byte e and 16 nibble bytes per 32 -------
# (ggml's block_mxfp4; the OCP microscaling format.) The E2M1 values are stored doubled as int8 so
# the table holds integers; the scale is halved to match (ggml's e8m0_to_fp32_half).
E2M1_DOUBLED = np.array([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], np.int8)
_MXFP4_CHUNK = 8192  # blocks per step of the encoder: its (blocks, 32, 16) error array stays ~16 MB


def e8m0_half(e: np.ndarray) -> np.ndarray:
    """2^(e-128) as float32 for E8M0 bytes e: half the scale the byte encodes (e = 0 and 1 are subnormal)."""
    e = e.astype(np.uint32)
    bits = np.where(e < 2, np.uint32(0x00200000) << e, (e - 1) << np.uint32(23))
    return bits.astype(np.uint32).view(np.float32)


def _mxfp4_exponent(amax: np.ndarray) -> np.ndarray:
    """ggml's `(uint8_t)(floorf(log2f(amax)) - 2 + 127)`, 0 for amax = 0.

    The float32 log2 is taken as float64's rounded to float32 (the correctly rounded value, which
    glibc's log2f gives: amax just below a power of two rounds up to it, and so does the exponent).
    The C cast wraps modulo 256 on x86-64 (through a 32-bit conversion): amax below 2^-125 gives a
    large exponent, an infinite amax 0, as ggml's bytes have them.
    """
    amax = amax.astype(np.float32, copy=False)
    finite = np.isfinite(amax) & (amax > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        log2 = np.log2(np.where(finite, amax, np.float32(1)).astype(np.float64)).astype(np.float32)
    e = np.floor(log2).astype(np.int64) + 125
    return np.where(finite, e & 0xFF, 0).astype(np.uint8)


def quantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    """(n, 32) float32 -> (n, 17) uint8, bit for bit ggml's quantize_row_mxfp4_ref: with d = 2^(e-128)
    the block's largest magnitude is 8 to 16 times d (the doubled table ends at 12: larger values
    round down to it), and each value takes the table entry of least float32 |entry * d - x| (ties:
    the lower index, so +0 before -0; a NaN value: index 0; NaNs never count toward the largest)."""
    blocks = blocks.astype(np.float32, copy=False)
    out = np.empty((blocks.shape[0], 17), np.uint8)
    table = E2M1_DOUBLED.astype(np.float32)
    for s in range(0, blocks.shape[0], _MXFP4_CHUNK):
        x = blocks[s:s + _MXFP4_CHUNK]
        e = _mxfp4_exponent(np.fmax.reduce(np.abs(x), axis=1, initial=np.float32(0)))
        grid = table * e8m0_half(e)[:, None]  # [n, 16]: exact (small integers times a power of two)
        with np.errstate(invalid="ignore"):
            err = np.abs(grid[:, None, :] - x[:, :, None])  # [n, 32, 16] float32, as the C loop rounds it
        codes = np.argmin(err, axis=2).astype(np.uint8)  # first minimum; an all-NaN row: 0
        out[s:s + _MXFP4_CHUNK, 0] = e
        out[s:s + _MXFP4_CHUNK, 1:] = _pack_nibbles(codes)
    return out


def dequantize_mxfp4(blocks: np.ndarray) -> np.ndarray:
    d = e8m0_half(blocks[:, :1])  # [n, 1]
    with np.errstate(over="ignore"):  # e = 255: 12 * 2^127 is inf, in ggml too
        return d * E2M1_DOUBLED[_unpack_nibbles(blocks[:, 1:])].astype(np.float32)


# ---- MXFP4 as OpenAI ships it (gpt-oss; transformers' Mxfp4 integration) ----------------------------
# `X_blocks` [..., rows, n_in/32, 16] U8 and `X_scales` [..., rows, n_in/32] U8: the same E8M0 exponent
# byte and the same E2M1 codes as ggml's block_mxfp4, only the codes sit in another order: element 2i
# in the low nibble of byte i and 2i+1 in its high nibble (ggml: j low and j+16 high in byte j).
# Moving the nibbles is the whole conversion: no value is re-encoded.


def mxfp4_from_openai(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """OpenAI's blocks [..., 16] and scales [...] (U8) -> ggml block_mxfp4 bytes [..., 17], bit for bit
    the same values."""
    assert blocks.shape[-1] == 16 and blocks.shape[:-1] == scales.shape, (blocks.shape, scales.shape)
    codes = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], 32)  # element order
    out = np.empty((*blocks.shape[:-1], 17), np.uint8)
    out[..., 0] = scales
    out[..., 1:] = codes[..., :16] | (codes[..., 16:] << 4)
    return out


def mxfp4_to_openai(ggml_blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ggml block_mxfp4 bytes [..., 17] -> OpenAI's (blocks [..., 16], scales [...]): the inverse of
    `mxfp4_from_openai`."""
    assert ggml_blocks.shape[-1] == 17, ggml_blocks.shape
    qs = ggml_blocks[..., 1:]
    codes = np.concatenate([qs & 0x0F, qs >> 4], axis=-1)  # element order
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8), ggml_blocks[..., 0].copy()
