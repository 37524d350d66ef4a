"""Packed weight-only kernels: int8 / int4 Linears that decode faster than fp32 on CPU.

torchao's saveable weight-only tensors (`IntxUnpackedToInt8Tensor`) dequantize the whole weight inside every
matmul: smaller, but slower than fp32 at batch 1 (decode reads the int values and writes a float copy per token).
torch ships kernels that read the int values directly: `aten._weight_int8pack_mm` (int8 per output channel) and
`aten._weight_int4pack_mm_for_cpu` (int4 in groups of 32–256, after `_convert_weight_to_int4pack_for_cpu`). They
are fast with bf16 activations on CPUs that compute bf16 natively (AVX512-BF16 / AMX) and several times slower
than fp32 with fp32 activations (measured on SmolLM2's shapes, 2 AVX512-BF16 cores, batch 1):

    576×576: fp32 31 µs · int8 22 µs · int4 42 µs      1536×576: fp32 108 µs · int8 41 µs · int4 45 µs
    (fp32 activations into the same kernels: 215 / 349 µs and 541 / 842 µs)

`pack(model)` swaps each weight-only Linear for a `PackedLinear` that keeps the torchao tensor as its weight (the
portable layout that is saved, exported to GGUF and counted) and builds the kernel's layout beside it at load, so
an artifact is tied to no CPU. The kernel serves small batches of rows (decoding: `SMALL_BATCH` rows or fewer);
larger ones (prefill, batched scoring) dequantize once per call and run the float matmul in the kernels' activation
dtype, which is faster there (576 → 1536 at 128 rows: int4pack 1.75 ms, dequantized to bf16 1.15 ms, fp32 1.70 ms;
torchao's own fp32 dequantizing matmul 2.58 ms).

int4 layers that read the same input tensor (q / k / v, gate / up: found by tracing one token) share one kernel
call over their weights side by side (`SharedInput`): a decode step's cost at this size is mostly per-call
overhead, not bytes (SmolLM2-135M int4 on 2 cores: ~6 of ~17 ms a token in the kernels; fused, +2–3 % tokens/s).

The kernel is chosen per device, and the choice is stated (`describe`): a CPU with native bf16 takes the packed
kernels with bf16 activations; any other CPU times them with bf16 and with fp32 activations against torchao's
dequantizing matmul on the model's own first layer and keeps the fastest. The kernels widen bf16 activations in
registers, so bf16 is fast even where bf16 GEMMs are not (an AVX2-only CPU, simulated by torch's AVX2 kernels,
int4 576 × 576: bf16 activations 37 µs, fp32 activations 271 µs, torchao's matmul 170 µs; SmolLM2 int4 decodes
44 tokens/s with bf16 activations, 11 with torchao's matmul, fp32 27); the large-batch matmul stays fp32 there.

On CUDA the int4 kernel is tinygemm's `aten._weight_int4pack_mm` (bf16 activations, compute capability 8.0+; its own
tiled layout, built by `_convert_weight_to_int4pack` from the same values, scales and zeros) and the int8 one
`_weight_int8pack_mm`'s CUDA kernel; each is timed against torchao's matmul on the first layer and checked against
it (relative error under `CHECK_TOLERANCE`, which also guards a layout this torch build computes differently), and
kept only where it is both right and faster. The layout belongs to its device: `place` moves a packed model and
packs it again there.

`int8-dynamic` stores the same int8-per-channel tensor and runs it as `DynamicInt8Linear`: each token's activations
are quantized to int8 on the fly (one scale per row) and multiplied by `aten._int_mm` (int8 × int8 → int32, oneDNN's
VNNI / AMX kernels). On MiniLM-L6, batch 1, 128 tokens, 2 AVX512-VNNI cores it is 1.8–1.85× fp32, ~0.93× the
speed of torch.ao's deprecated `quantize_dynamic` (fbgemm fuses the row quantization eager ops pay for), which it
replaces; torchao's `Int8DynamicActivationInt8WeightConfig` measured 1.04× eager (it matches only under
torch.compile, after ~33 s of compiling). A CPU without int8 dot products (AVX2 only) times three ways on the first
layer and keeps the fastest: int8 activations with the weights as two 7-bit halves (one int8 matmul saturates there:
`DynamicInt8Linear`), the int8 weights weight-only through the packed int8 kernel, and the dequantizing matmul (the
last two keep the activations in floating point, said in the description).

`Int8Embedding` looks up int8 rows and dequantizes only those (torchao's embedding tensor dequantizes the whole
table on every lookup: 138 ms per token on SmolLM2's 49152 × 576 table).
"""

from __future__ import annotations

import functools
import itertools
import math
import time

import torch

from llmctl.core.device import cpu_has_int8_dot, cpu_has_native_bf16
from llmctl.core.models import tensor_bytes
from llmctl.core.quantization import lowrank

SMALL_BATCH = 64  # rows at or under which the packed kernel runs; above, dequantize + float matmul (prefill)
INT4_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu takes
INNER_K_TILES = 2  # the int4 CPU kernel's K tiling (input widths must divide by 16 · INNER_K_TILES)
CUDA_K_TILES = (8, 4, 2)  # the int4 CUDA kernel's K tilings, widest first (input widths must divide by 16 · tiles)
CHECK_TOLERANCE = 0.02  # relative error a timed candidate kernel may show against the dequantized weights (bf16)
INT8_MM = torch.ops.aten._weight_int8pack_mm.default  # the overloads themselves: no lookup per call (CPU and CUDA)
INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu.default
INT4_MM_CUDA = torch.ops.aten._weight_int4pack_mm.default  # tinygemm: bf16 activations, compute capability 8.0+


class PackedLinear(torch.nn.Module):
    """A weight-only int8 / int4 Linear run by torch's packed kernels. `weight` stays the torchao tensor (state
    dict, GGUF export and size read it); the kernel's copy of the values lives in non-persistent buffers."""

    def __init__(self, linear: torch.nn.Linear, *, bits: int, group: int | None, activations: torch.dtype):
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = w, linear.bias
        self.bits, self.group, self.activations = bits, group, activations
        # the large-batch (prefill) matmul's dtype: the kernels' own, but fp32 on a CPU without native bf16 (the
        # kernels widen bf16 in registers as they read it; a bf16 GEMM there is emulated, ~100× slower)
        native = w.device.type != "cpu" or cpu_has_native_bf16()
        self.matmul = activations if native else torch.float32
        self.lowrank = hasattr(linear, "lowrank_a")  # a rank-r correction of the rounding error (quantization.lowrank)
        self.shared: SharedInput | None = None  # int4 siblings reading the same input, computed in one call (`fuse`)
        if self.lowrank:  # fp32 factors, used in fp32 whatever the activations (`_plus_lowrank`)
            self.lowrank_a, self.lowrank_b = linear.lowrank_a, linear.lowrank_b
        scale = w.scale.reshape(self.out_features, -1).float()
        if bits == 8:
            w.qdata = _aligned(w.qdata)  # the kernel reads the stored values themselves: no second copy
            self.register_buffer("scales", scale.reshape(-1).to(activations), persistent=False)
        else:
            zero = (  # torchao: (q − zero_point) · scale; the kernel: (q + 8 − 8) · scale + zero
                -w.zero_point.reshape(self.out_features, -1).float() * scale
                if w.zero_point is not None
                else torch.zeros_like(scale)
            )
            op, packed = _int4pack(w.qdata)
            self.register_buffer("packed", packed, persistent=False)
            scales_zeros = torch.stack([scale.t(), zero.t()], dim=-1).contiguous().to(activations)  # (K/g, N, 2)
            self.register_buffer("scales_zeros", scales_zeros, persistent=False)
        self._kernel = (INT8_MM, w.qdata, self.scales) if bits == 8 else (op, self.packed, group, self.scales_zeros)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows > SMALL_BATCH:  # prefill / scoring: the weight dequantized once, the float matmul (bf16 where native)
            bias = self.bias.to(self.matmul) if self.bias is not None else None
            y = torch.nn.functional.linear(x.to(self.matmul), self.dequantized(), bias)
            return (self._corrected(y, x, rows) if self.lowrank else y).to(x.dtype)
        if self.shared is not None:
            return self.shared.output(self, x)
        # the kernel and its operands sit in one plain attribute: a decode step makes ~200 of these calls
        y = self._kernel[0](_rows(x, rows, self.activations), *self._kernel[1:])
        y = self._corrected(y, x, rows) if self.lowrank else y
        return _as_output(y, x, self.bias)

    def _corrected(self, y: torch.Tensor, x: torch.Tensor, rows: int) -> torch.Tensor:
        return _plus_lowrank(y, x, rows, self.lowrank_a.t(), self.lowrank_b.t()).reshape(y.shape)

    def unpacked(self) -> torch.nn.Linear:
        """The Linear it was built from: torchao's tensor as its weight, the low-rank correction as a forward hook."""
        linear = _linear(self)
        if self.lowrank:
            lowrank.attach(linear, self.lowrank_a.shape[0])
            linear.lowrank_a, linear.lowrank_b = self.lowrank_a, self.lowrank_b
        return linear

    def dequantized(self) -> torch.Tensor:
        """The weight in the large-batch matmul's dtype (`matmul`), computed there from the stored values (two passes;
        torchao's `dequantize` takes five in fp32: half the prefill time of an int4 SmolLM2 went to it)."""
        w, n, dtype = self.weight, self.out_features, self.matmul
        scale = w.scale.reshape(n, -1, 1)
        q = w.qdata.reshape(n, scale.shape[1], -1).to(dtype)
        if w.zero_point is not None and self.bits == 4:  # (the int8 weights are symmetric: packable)
            q = q.sub_(w.zero_point.reshape(n, -1, 1).to(dtype))
        return q.mul_(scale.to(dtype)).reshape(n, self.in_features)

    def kernel_bytes(self) -> int:
        """Bytes a batch-1 step reads: the values in the kernel's layout, their scales, the bias."""
        extra = _bytes(self.lowrank_a, self.lowrank_b) if self.lowrank else 0
        if self.bits == 8:
            return _bytes(self.weight.qdata, self.scales, self.bias) + extra
        if self.shared is not None:  # its columns of the shared layout: two values a byte, a scale and zero each group
            values = self.out_features * self.in_features // 2
            return values + self.shared.scales_zeros[:, : self.out_features].nbytes + _bytes(self.bias) + extra
        return _bytes(self.packed, self.scales_zeros, self.bias) + extra

    def extra_repr(self) -> str:
        kernel = "int8pack" if self.bits == 8 else f"int4pack (groups of {self.group})"
        kernel += "" if self.weight.device.type == "cpu" else f" on {self.weight.device.type}"
        kernel += " shared with its siblings" if self.shared is not None else ""
        fix = f" + rank-{self.lowrank_a.shape[0]} correction" if self.lowrank else ""
        return f"{self.in_features} → {self.out_features}, {kernel}{fix}, {str(self.activations)[6:]} activations"


class SharedInput:
    """Sibling int4 `PackedLinear`s that read the same input tensor (a decoder layer's q / k / v projections, its
    gate / up projections) run as one: a single kernel call over their weights side by side computes every
    member's output, members' low-rank corrections are added together (their A factors stacked, their B factors
    block-diagonal: one mm and one addmm), the result is cast back, shaped and biased once and split into the
    members' outputs. The first member called with an input computes; the others, called with that same tensor,
    take their part, and once every member has, the group lets go of it. A member called with another input
    recomputes, so the result never depends on the call order. SmolLM2's layers: 4 kernel calls instead of 7, each
    call with its casts ~12 µs on 2 cores."""

    def __init__(self, members: list[PackedLinear]):
        self.op, self.packed = _int4pack(torch.cat([m.weight.qdata for m in members]))
        self.scales_zeros = torch.cat([m.scales_zeros for m in members], dim=1).contiguous()
        self.group, self.activations = members[0].group, members[0].activations
        self.sizes = [m.out_features for m in members]
        self.width = sum(self.sizes)
        self.index = {id(m): i for i, m in enumerate(members)}
        device = self.packed.device
        biases = [
            m.bias.detach() if m.bias is not None else torch.zeros(m.out_features, device=device) for m in members
        ]
        self.bias = torch.cat(biases) if any(m.bias is not None for m in members) else None  # Qwen2's q/k/v; not Llama
        # the members' corrections as one: A stacked, B block-diagonal, both transposed as `_plus_lowrank` takes
        # them (copies of the factors, made at load as the packed values are)
        fixed = [m for m in members if m.lowrank]
        self.a_t = torch.cat([m.lowrank_a.detach() for m in fixed]).t().contiguous() if fixed else None
        self.b_t = None
        if fixed:
            self.b_t = torch.zeros(self.a_t.shape[1], self.width, device=self.a_t.device)
            rank, starts = 0, [0, *itertools.accumulate(self.sizes)]
            for m in fixed:
                lo, r = starts[self.index[id(m)]], m.lowrank_a.shape[0]
                self.b_t[rank : rank + r, lo : lo + m.out_features] = m.lowrank_b.detach().t()
                rank += r
        for m in members:
            del m.packed, m.scales_zeros, m._kernel  # the shared layout replaces each member's own
            m.shared = self
        # held by the first member as non-persistent buffers too, so what counts a model's resident bytes
        # (models.weight_bytes: eval's peak memory) sees the shared layout
        for name in ("packed", "scales_zeros", "a_t", "b_t", "bias"):
            if getattr(self, name) is not None:
                members[0].register_buffer(f"shared_{name}", getattr(self, name), persistent=False)
        self.input, self.outputs, self.waiting = None, (), 0

    def output(self, member: PackedLinear, x: torch.Tensor) -> torch.Tensor:
        """The member's output for input `x`: corrected, biased, in x's dtype and shape."""
        if x is not self.input:
            rows = x.numel() // member.in_features
            y = self.op(_rows(x, rows, self.activations), self.packed, self.group, self.scales_zeros)
            y = _plus_lowrank(y, x, rows, self.a_t, self.b_t) if self.a_t is not None else y
            y = _as_output(y, x, self.bias)
            self.input, self.outputs, self.waiting = x, y.split(self.sizes, dim=-1), len(self.sizes)
        y = self.outputs[self.index[id(member)]]
        self.waiting -= 1
        if not self.waiting:  # every member has its part: nothing kept between forward passes
            self.input, self.outputs = None, ()
        return y


def fuse(model) -> tuple[int, int]:
    """Group the model's int4 `PackedLinear`s that read the same input tensor, found by one forward pass of one
    token, into `SharedInput`s; returns (layers that now share a kernel call, calls they make). A model that does
    not run on `input_ids` alone is left as it is."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear) and m.bits == 4 and m.shared is None]
    if len(packed) < 2:
        return 0, 0
    seen: list[tuple[torch.Tensor, PackedLinear]] = []  # (input, layer) in call order; holding the inputs keeps ids
    hooks = [m.register_forward_pre_hook(lambda m, args: seen.append((args[0], m))) for m in packed]
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(1, 1, dtype=torch.long, device=packed[0].weight.device))
    except Exception:  # noqa: BLE001 — fusing is an optimisation: a model needing other inputs runs unfused
        return 0, 0
    finally:
        for hook in hooks:
            hook.remove()
    groups: dict[tuple, list[PackedLinear]] = {}
    for x, m in seen:
        members = groups.setdefault((id(x), m.group, m.activations), [])
        if m not in members:
            members.append(m)
    fused = [members for members in groups.values() if len(members) > 1]
    for members in fused:
        SharedInput(members)
    return sum(map(len, fused)), len(fused)


class DynamicInt8Linear(torch.nn.Module):
    """An int8-dynamic Linear: int8 weights per output channel (torchao's tensor, kept as `weight`) × the input's
    rows quantized to int8 on the fly, one symmetric scale per row (token), through `aten._int_mm`.

    On a CPU without int8 dot products (no VNNI / AMX) oneDNN's int8 matmul sums pairs of u8 × s8 products into
    int16 with saturation (`vpmaddubsw`), so full-range int8 × int8 comes out wrong (uniform int8 operands: 70 % of
    the sums, with torch's oneDNN held to AVX2). There the weights run as two 7-bit halves, q = 2 · high + low (high
    in −64..63, low 0 or 1), whose products cannot saturate: two exact int8 matmuls, summed in int32, so the model
    computes what it computes on any other CPU. (Activations rounded to 7 bits, as torch.ao's fbgemm path did, need
    one matmul but cost SmolLM2's int8-dynamic +1.86 perplexity instead of +0.14 on the same text: rejected.)"""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        w = linear.weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = w, linear.bias
        w.qdata = _aligned(w.qdata)
        self.register_buffer("scales", w.scale.reshape(-1).float() / 127, persistent=False)  # (÷ 127: see forward)
        self.halves = int_mm_saturates()
        if self.halves:  # kernel copies beside the stored values (not saved), transposed as _int_mm takes them
            high = torch.div(w.qdata, 2, rounding_mode="floor")
            self.register_buffer("high_t", high.t().contiguous(), persistent=False)
            self.register_buffer("low_t", (w.qdata - 2 * high).t().contiguous(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float()
        if flat.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features)
        # one scale per row, max |x| / 127; as few passes over the activations as possible (each op costs here)
        peak = torch.maximum(flat.amax(-1, keepdim=True), flat.amin(-1, keepdim=True).neg_()).clamp_min_(1e-12)
        q = _aligned(torch.mul(flat, 127 / peak).round_().to(torch.int8))
        if self.halves:  # int32: 2 · (q · high) + q · low, each product within int16 (see the class)
            dot = torch._int_mm(q, self.high_t).mul_(2).add_(torch._int_mm(q, self.low_t))
        else:
            dot = torch._int_mm(q, self.weight.qdata.t())
        y = torch.mul(dot, peak)  # int32 · row peak · (channel scale / 127)
        y = torch.addcmul(self.bias, y, self.scales) if self.bias is not None else y.mul_(self.scales)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def kernel_bytes(self) -> int:
        """Bytes a batch-1 step reads: the int8 values (or their two halves), their scales, the bias."""
        values = (self.high_t, self.low_t) if self.halves else (self.weight.qdata,)
        return _bytes(*values, self.scales, self.bias)

    def unpacked(self) -> torch.nn.Linear:
        """The Linear it was built from (torchao's tensor as its weight)."""
        return _linear(self)

    def extra_repr(self) -> str:
        halves = " (7-bit weight halves)" if self.halves else ""
        return f"{self.in_features} → {self.out_features}, _int_mm{halves}, int8 activations per row"


class Int8Embedding(torch.nn.Module):
    """An embedding table as int8 rows (torchao's tensor, one scale per row, kept as `weight`) that dequantizes only
    the rows it looks up."""

    def __init__(self, embedding: torch.nn.Embedding):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.weight = embedding.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = w.qdata[ids].to(w.scale.dtype)
        if w.zero_point is not None:
            rows = rows - w.zero_point[ids].to(rows.dtype)
        return (rows * w.scale[ids]).to(w.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8 rows"


def index_tables(model, names) -> None:
    """Swap the named embedding tables (their weights already torchao int8 tensors) for row-wise lookups."""
    for name in names:
        if not isinstance(table := model.get_submodule(name), Int8Embedding):
            model.set_submodule(name, Int8Embedding(table))


def _bytes(*tensors) -> int:
    return sum(tensor_bytes(t) for t in tensors if t is not None)


def _plus_lowrank(y: torch.Tensor, x: torch.Tensor, rows: int, a_t: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """y + B (A x) as `rows` rows, in fp32 as one mm and one addmm (bf16 GEMMs this thin take 64 µs a layer here,
    fp32 10 µs), under a bf16 run's autocast too (it would cast both factors to bf16 at every call); `a_t`, `b_t`:
    the factors transposed (in × r, r × out)."""
    if torch.is_autocast_enabled(x.device.type):
        with torch.autocast(x.device.type, enabled=False):
            return _plus_lowrank(y, x, rows, a_t, b_t)
    a = torch.mm(x.reshape(rows, -1).float(), a_t)
    return torch.addmm(y.reshape(rows, -1).float(), a, b_t)


def _int4pack(values: torch.Tensor) -> tuple:
    """(the int4 kernel of the values' device, torchao's int4 values (−8..7, one an int8, out × in) in its layout:
    0..15, packed). Both kernels read the same scales and zeros ((K/g, N, 2): (q − 8) · scale + zero)."""
    shifted = values.to(torch.int32) + 8
    if values.device.type == "cuda":  # tinygemm: two values a byte, the even column in the high nibble, then tiled
        tiles = next(t for t in CUDA_K_TILES if values.shape[1] % (16 * t) == 0)
        pairs = (shifted[:, ::2] << 4 | shifted[:, 1::2]).to(torch.uint8).contiguous()
        return INT4_MM_CUDA, torch.ops.aten._convert_weight_to_int4pack(pairs, tiles)
    return INT4_MM, torch.ops.aten._convert_weight_to_int4pack_for_cpu(shifted.contiguous(), INNER_K_TILES)


def _linear(module) -> torch.nn.Linear:
    """A plain Linear holding `module`'s weight and bias (the tensors themselves)."""
    linear = torch.nn.Linear(module.in_features, module.out_features, bias=False, device="meta")
    linear.weight, linear.bias = module.weight, module.bias
    return linear


def _as_output(y: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A kernel's rows `y` as the Linear's output for input `x`: in x's dtype and leading shape, plus the bias."""
    y = y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])
    return y + bias.to(y.dtype) if bias is not None else y


def _rows(x: torch.Tensor, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """`x` as the packed kernels take it: `rows` rows, contiguous, aligned, in their activation dtype."""
    return _aligned(x.reshape(rows, -1).to(dtype).contiguous())


def _aligned(t: torch.Tensor) -> torch.Tensor:
    """`t`, or a copy of it where its data does not start on a 64-byte boundary: the packed kernels read with
    aligned vector loads and crash on a tensor that starts mid-line (safetensors' tensors, slices)."""
    return t if t.data_ptr() % 64 == 0 else t.clone()


def packable(module, bits: int, *, dynamic: bool = False) -> bool:
    """A Linear whose weight is torchao's weight-only tensor in a shape the packed kernel (`dynamic`: `_int_mm`)
    takes."""
    w = getattr(module, "weight", None)
    if not isinstance(module, torch.nn.Linear) or not hasattr(w, "qdata"):
        return False
    if w.device.type not in (("cpu",) if dynamic else ("cpu", "cuda")):  # (the CUDA kernels: weight-only)
        return False
    block = tuple(getattr(w, "block_size", None) or ())
    if bits == 8:  # per output channel, symmetric (the int8 kernels have no zero point)
        zero_free = w.zero_point is None or not bool(w.zero_point.any())
        # an input width off a multiple of 16 gives wrong sums (or a crash) in _weight_int8pack_mm, silently
        return block == (1, module.in_features) and zero_free and (dynamic or module.in_features % 16 == 0)
    return (
        len(block) == 2
        and block[0] == 1
        and block[1] in INT4_GROUPS
        and module.in_features % (16 * INNER_K_TILES) == 0
        and module.out_features % 16 == 0  # _convert_weight_to_int4pack_for_cpu: N divisible by 16
    )


def pack(model, record: dict) -> str | None:
    """Swap the model's weight-only Linears for packed ones where the machine runs them faster, on the device the
    weights are on; returns what was chosen (also kept as `model.llmctl_kernels`), None when the record's scheme has
    no packed kernel. `place` moves a packed model to another device and packs it there."""
    model.llmctl_quantization = record  # what `place` packs again on another device
    for attribute in ("llmctl_kernels", "llmctl_own_activations"):
        if hasattr(model, attribute):
            delattr(model, attribute)
    if record.get("scheme") == "int8-dynamic":
        return _pack_dynamic(model, record)
    if record.get("scheme") not in ("int8-weight", "int4-weight"):
        return None
    widths = {**dict.fromkeys(record["linear"], int(record["bits"])), **dict.fromkeys(record.get("head_int8") or [], 8)}
    found = [(n, m, widths[n]) for n, m in model.named_modules() if n in widths and packable(m, widths[n])]
    if not found:
        device = next((m.weight.device.type for n, m in model.named_modules() if n in widths), "cpu")
        why = (
            "no layer in a shape the packed kernels take"
            if device in ("cpu", "cuda")
            else f"no packed kernels on {device}"
        )
        model.llmctl_kernels = f"torchao dequantizing matmul ({why})"
        return model.llmctl_kernels
    group = int(record.get("group_size") or 0) or None

    def group_of(bits: int) -> int | None:
        return group if bits == 4 else None  # an int8 layer (the body's, or an int8 head) scales per channel

    activations, why = _choose(found[0][1], found[0][2], group_of(found[0][2]))
    if activations is None:
        model.llmctl_kernels = why
        return why
    for name, module, bits in found:
        model.set_submodule(name, PackedLinear(module, bits=bits, group=group_of(bits), activations=activations))
    model.llmctl_own_activations = str(activations).removeprefix("torch.")  # what the kernels compute in (Runtime)
    cuda = found[0][1].weight.device.type == "cuda"
    ops = {8: "aten._weight_int8pack_mm", 4: "aten._weight_int4pack_mm" + ("" if cuda else "_for_cpu")}
    counts = {b: sum(1 for *_, bits in found if bits == b) for b in (4, 8)}
    used = " + ".join(f"{ops[b]} ({n} layers)" for b, n in counts.items() if n)
    fixed = sum(1 for _, m, _ in found if hasattr(m, "lowrank_a"))
    used += f", {fixed} of them + a low-rank error correction" if fixed else ""
    layers, calls = fuse(model)
    used += f", {layers} int4 layers that read the same input run as {calls} kernel calls" if layers else ""
    model.llmctl_kernels = f"{used} for batches of up to {SMALL_BATCH} rows, {why}"
    return model.llmctl_kernels


def place(model, device) -> None:
    """Move `model` to `device`. The packed kernels' layout belongs to the device it was built on (the CPU and CUDA
    int4 kernels take different ones; a kernel holds its operands directly), so a model with quantized layers that
    goes to another kind of device is unpacked, moved and packed there: the kernels are chosen again, for it."""
    device = torch.device(device)
    record = getattr(model, "llmctl_quantization", None)  # set by `pack`: a model without it has no packed layers
    weight = record and next((m.weight for m in model.modules() if hasattr(getattr(m, "weight", None), "qdata")), None)
    here = weight is not None and weight.device.type == device.type
    if weight is None or (here and device.index in (None, weight.device.index)):
        model.to(device)
        return
    for name, module in list(model.named_modules()):
        if isinstance(module, (PackedLinear, DynamicInt8Linear)):
            model.set_submodule(name, module.unpacked())
    model.to(device)
    pack(model, record)


def _pack_dynamic(model, record: dict) -> str:
    """int8-dynamic: every quantized Linear as a `DynamicInt8Linear` where the CPU has int8 dot products. Elsewhere
    the fastest of it, the same int8 weights run weight-only by the packed int8 kernel (bf16 or fp32 activations)
    and torchao's dequantizing matmul, timed on the first layer at one row for a model that generates (decoding) and
    16 otherwise; weight-only, the activations stay in floating point, and the description says so."""
    names = set(record["linear"])
    found = [(n, m) for n, m in model.named_modules() if n in names and packable(m, 8, dynamic=True)]
    if not found:
        model.llmctl_kernels = "torchao dequantizing matmul (no layer the int8 matmul takes)"
        return model.llmctl_kernels
    rows = 1 if getattr(model, "can_generate", lambda: False)() else 16
    use, why = _choose_dynamic(found[0][1], rows)
    if use == "int8":
        for name, module in found:
            model.set_submodule(name, DynamicInt8Linear(module))
        model.llmctl_own_activations = "int8"
        model.llmctl_kernels = f"aten._int_mm with int8 activations per row ({len(found)} layers), {why}"
    elif use is not None:  # weight-only: the packed int8 kernel with these activations
        weight_only = [(n, m) for n, m in found if packable(m, 8)]
        for name, module in weight_only:
            model.set_submodule(name, PackedLinear(module, bits=8, group=None, activations=use))
        model.llmctl_own_activations = str(use).removeprefix("torch.")
        model.llmctl_kernels = (
            f"aten._weight_int8pack_mm ({len(weight_only)} layers) with {str(use)[6:]} activations, weight-only: "
            f"its activations are not rounded to int8 on this CPU {why}"
        )
    else:
        model.llmctl_kernels = f"torchao dequantizing matmul: its activations are not rounded to int8 on this CPU {why}"
    return model.llmctl_kernels


@functools.cache
def int_mm_saturates() -> bool:
    """Whether `aten._int_mm` gets full-range int8 × int8 wrong here: its int16 pair sums saturate on a CPU without
    int8 dot products (the product of 64 values of 127 by 127 came out 8,160 instead of 1,032,256 with oneDNN held
    to AVX2). Probed once per process, so it holds whatever the CPU flags or oneDNN's settings say."""
    a = torch.full((17, 64), 127, dtype=torch.int8)
    b = torch.full((64, 8), 127, dtype=torch.int8)
    return not bool((torch._int_mm(a, b) == 64 * 127 * 127).all())


def _choose_dynamic(module, rows: int) -> tuple:
    """What runs int8-dynamic's layers: "int8" (`DynamicInt8Linear`), an activation dtype (the packed int8 kernel,
    weight-only) or None (torchao's dequantizing matmul); and why, timed on `rows` rows where the CPU has no int8
    dot products."""
    if cpu_has_int8_dot() and not int_mm_saturates():
        return "int8", "the CPU has int8 dot products (VNNI / AMX)"
    int8, dequant, _ = _timed(  # (its rounding of the activations is the scheme's: no error check)
        ("dynamic", rows, module.in_features, module.out_features), lambda: DynamicInt8Linear(module), module, rows
    )
    packed, dequant = _packed_times(module, 8, None, rows, dequant) if packable(module, 8) else ({}, dequant)
    times = {"int8": int8, **packed}
    use = min(times, key=times.get)
    halves = " as two 7-bit halves (a full int8 product saturates here)" if int_mm_saturates() else ""
    timings = ", ".join(
        f"{'int8 activations' + halves if k == 'int8' else str(k)[6:] + ' weight-only'} {us:.0f} µs"
        for k, us in times.items()
    )
    why = f"({timings}, dequantizing {dequant:.0f} µs at {rows} row{'s' if rows > 1 else ''}; no int8 dot products)"
    return (use if times[use] < dequant else None), why


def _choose(module, bits: int, group: int | None) -> tuple:
    """(activation dtype for the packed kernels, or None for torchao's dequantizing matmul; why)."""
    if module.weight.device.type == "cuda":
        return _choose_cuda(module, bits, group)
    if cpu_has_native_bf16():
        return torch.bfloat16, "bf16 activations: the CPU computes bf16 natively"
    # Without native bf16 the kernels still take bf16 activations fast: they widen them to fp32 in registers as they
    # read them (only bf16 GEMMs are slow there). Both activation dtypes are timed against torchao's matmul.
    right, dequant = _packed_times(module, bits, group, 1)
    if right and min(right.values()) < dequant:
        dtype = min(right, key=right.get)
        other = ", ".join(f"{str(d)[6:]} {us:.0f} µs" for d, us in right.items() if d != dtype)
        return dtype, (
            f"{str(dtype)[6:]} activations on a CPU without native bf16 ({right[dtype]:.0f} µs vs dequantizing "
            f"{dequant:.0f} µs{', ' + other if other else ''})"
        )
    fastest = f"{min(right.values()):.0f} µs" if right else "none computing right"
    return None, f"torchao dequantizing matmul ({dequant:.0f} µs vs the packed kernels' {fastest} on this CPU)"


def _packed_times(module, bits: int, group: int | None, rows: int, dequant: float = math.inf) -> tuple[dict, float]:
    """({activation dtype: µs} of the packed kernel with bf16 and with fp32 activations on `rows` rows, those that
    compute what torchao's matmul does only; µs of torchao's matmul, the least of its timings and `dequant`)."""
    times = {}
    for dtype in (torch.bfloat16, torch.float32):
        us, baseline, error = _timed(
            (bits, group, rows, module.in_features, module.out_features, dtype),
            lambda dtype=dtype: PackedLinear(module, bits=bits, group=group, activations=dtype),
            module,
            rows,
        )
        dequant = min(dequant, baseline)
        if error <= CHECK_TOLERANCE:
            times[dtype] = us
    return times, dequant


def _choose_cuda(module, bits: int, group: int | None) -> tuple:
    """On CUDA: the packed kernel with bf16 activations (what tinygemm takes) where it computes what the dequantized
    weights give and runs faster than torchao's matmul on the model's first quantized layer, timed at batch 1."""
    device = module.weight.device
    if bits == 4 and torch.cuda.get_device_capability(device) < (8, 0):
        return None, "torchao dequantizing matmul (the int4 CUDA kernel needs compute capability 8.0 or newer)"
    try:
        packed, dequant, error = _timed(
            ("cuda", str(device), bits, group, module.in_features, module.out_features),
            lambda: PackedLinear(module, bits=bits, group=group, activations=torch.bfloat16),
            module,
            1,
        )
    except RuntimeError as e:  # a kernel this torch build or GPU lacks
        return None, f"torchao dequantizing matmul (the packed CUDA kernel failed here: {str(e).splitlines()[0][:120]})"
    if error > CHECK_TOLERANCE:
        return None, (
            f"torchao dequantizing matmul (the packed CUDA kernel's output is {error:.1%} off the dequantized "
            "weights' here)"
        )
    if packed < dequant:
        return torch.bfloat16, f"bf16 activations on CUDA ({packed:.0f} µs vs dequantizing {dequant:.0f} µs)"
    return None, f"torchao dequantizing matmul (packed CUDA kernel {packed:.0f} µs vs {dequant:.0f} µs)"


_CHOSEN: dict[tuple, tuple] = {}  # one timing per layer shape and process: a model and its reload run alike


def _timed(key: tuple, build, module, rows: int) -> tuple[float, float, float]:
    """(µs of the kernel `build()` makes, µs of torchao's dequantizing matmul (`module`), the kernel's relative error
    against that matmul in fp32) on `rows` random rows, measured once per `key` and process."""
    if key not in _CHOSEN:
        x = torch.randn(rows, module.in_features, device=module.weight.device)
        kernel = build()
        with torch.inference_mode():
            reference = module(x).float()
            error = float((kernel(x).float() - reference).norm() / reference.norm().clamp_min(1e-12))
        _CHOSEN[key] = (_best_us(kernel, x), _best_us(module, x), error)
    return _CHOSEN[key]


def _best_us(fn, x: torch.Tensor) -> float:
    """The best of 10 timed calls (after 3 warm ones), in µs (on CUDA, each call waited for)."""
    wait = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode():
        for _ in range(3):
            fn(x)
        times = []
        for _ in range(10):
            wait()
            start = time.perf_counter()
            fn(x)
            wait()
            times.append(time.perf_counter() - start)
    return 1e6 * min(times)


def describe(model) -> str | None:
    """Which kernels run the model's quantized Linears (None: not a packed-kernel scheme)."""
    return getattr(model, "llmctl_kernels", None)
