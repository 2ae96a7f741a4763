"""What a `.pt2` archive may hold before torch parses any of it: the whole policy, with the reason for each rule.

`torch.export.load` trusts its archive. Checked on torch 2.13 (shared/NOTES.md), each of these ran code or touched
files on load or on the first forward pass:
- a symbolic size whose `expr_str` is Python: the deserializer hands it to `sympy.sympify`, which evaluates it;
- `guards_code` strings: `ExportedProgram.module()` pastes them into a function and `exec`s it;
- a tree spec context holding `{"__enum__": ..., "fqn": "module:attr"}`: `treespec_loads` imports `module`;
- weights or constants marked `use_pickle`, `opaque_obj_*` and `custom_obj_*` constants, legacy `.pt` weights and
  the sample inputs: all are unpickled;
- `aotinductor/` members: compiled native libraries that torch loads and runs;
- graph nodes such as `aten.from_file(path, shared=True)` followed by `aten.fill_`: they map and overwrite a file.

So `sanitize_export_archive` reads the zip and every JSON member itself, checks them against an allow-list (members,
fields, operators, an expression grammar, tensor sizes), and writes a new archive holding only what it checked: the
JSON as it re-serialises it, the raw tensor bytes, and empty sample inputs. Torch only ever sees that archive, and
even then only inside the sandboxed worker (`analyzers.loading.sandbox`). It never imports torch, so the dashboard
and the CLI can refuse a hostile file before any worker starts.

Every refusal is an `ArchivePolicyError` with one line that names the member, field or operator, and says how to
export the model so that it passes.
"""
from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass

from ..errors import AnalyzerError

EXPORT_ADVICE = ("export it with torch.export.export(model.eval(), (example,), "
                 "dynamic_shapes=({0: torch.export.Dim('batch')},)) and torch.export.save")

# --- limits ---------------------------------------------------------------------------------------------------------
MAX_JSON_BYTES = 64 << 20  # model.json of a large transformer is a few MB
MAX_JSON_DEPTH = 200  # nested subgraphs of higher-order ops add depth; recursion must stay far from Python's limit
MAX_MEMBERS = 100_000
MAX_EXPR_CHARS = 2_000
MAX_INT_DIGITS = 19  # fits int64: sizes, strides and hints are int64 in torch
DEFAULT_MAX_TENSOR_BYTES = 8 << 30  # all weights and constants together, and any one tensor the graph declares

# --- archive layout -------------------------------------------------------------------------------------------------
# Members under the archive's single root folder. Weight and constant files are allowed only where a config names
# them. Everything else (aotinductor/, other extra/ files, executorch/, legacy model.pt weights, a second model) is
# refused. The names a model carries (`torch.export.save(..., extra_files={"class_names.json": ...})`) are read
# here as JSON lists of text, and never reach torch.
FIXED_MEMBERS = {
    "archive_format": "the archive format marker",
    "archive_version": "the archive version",
    "byteorder": "the byte order",
    ".data/version": "the serialization version",
    ".data/serialization_id": "the serialization id",
    "models/model.json": "the exported program",
    "data/weights/model_weights_config.json": "the weights config",
    "data/constants/model_constants_config.json": "the constants config",
    "data/sample_inputs/model.pt": "the sample inputs (a pickle; dropped, never loaded)",
}
REQUIRED_MEMBERS = ("archive_format", "archive_version", "models/model.json",
                    "data/weights/model_weights_config.json", "data/constants/model_constants_config.json")
OPTIONAL_MEMBERS_REFUSED = {
    "data/aotinductor/": "AOTInductor members are compiled native code, which would run on load",
    "data/executorch/": "ExecuTorch members are not a torch.export program",
    "data/mtia/": "MTIA members are compiled device code",
    "extra/": "extra files are not part of a model (only extra/class_names.json and extra/feature_names.json, "
              "JSON lists of names, are read)",
    "data/weights/model.pt": "legacy weights are a pickle",
    "data/constants/model.pt": "legacy constants are a pickle",
}
NAME_MEMBERS = {"extra/class_names.json": "class_names", "extra/feature_names.json": "feature_names"}
MAX_NAMES, MAX_NAME_CHARS, MAX_NAMES_BYTES = 100_000, 256, 8 << 20
ROOT_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
WEIGHT_FILE = re.compile(r"^weight_[0-9]{1,9}$")
TENSOR_CONSTANT_FILE = re.compile(r"^tensor_[0-9]{1,9}$")
ZIP_MAGIC = b"PK\x03\x04"

# --- strings by the role they play ----------------------------------------------------------------------------------
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,199}$")  # node, tensor and argument names
FQN = re.compile(r"^[A-Za-z0-9_.@-]{0,400}$")  # module paths such as encoder.layer.0.attention (@1 marks a reuse)
MODULE_TYPE = re.compile(r"^[A-Za-z0-9_.<>]{0,300}$")  # a class path in nn_module_stack: stored, never imported
MODULE_STACK_PART = re.compile(r"^[A-Za-z0-9_.@\[\]()'\", -]{0,400}$")  # its key and path, e.g. L['self'].layer[0]
SYMBOL = re.compile(r"^[a-z]{1,4}[0-9]{1,9}$")  # torch's symbol names: s77, u0, zuf3 ...
STRING_ARGUMENT = re.compile(r"^[ -~]{0,256}$")  # operator string options such as gelu's "tanh", einsum equations
_SIZE = r"L\['[A-Za-z_]\w{0,63}'\]\.size\(\)\[\d{1,2}\]"
SIZE_GUARD = re.compile(rf"{_SIZE} (?:==|!=|<=|>=|<|>) (?:{_SIZE}|\d{{1,12}})", re.ASCII)
TORCH_VERSION = re.compile(r"^(<=)?[0-9]+\.[0-9]+[A-Za-z0-9.+_-]{0,40}$")
VERIFIERS = {"TRAINING", "INFERENCE", "ATEN", "CORE_ATEN"}
DEVICES = {"cpu", "cuda"}
# torch._export.serde.schema.ScalarType -> bytes per element (UNKNOWN = 0 and complex types are refused)
ELEMENT_BYTES = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 2, 7: 4, 8: 8, 12: 1, 13: 2, 14: 2, 15: 1, 16: 1, 17: 1, 18: 1,
                 19: 4, 20: 8, 21: 2}
LAYOUTS = {1, 2, 3, 4, 5, 6, 7}
MEMORY_FORMATS = {0, 1, 2, 3, 4}

# Argument kinds that are a plain value, a list (1) or a list of lists (2) of one element type: the element's checker.
NESTED_ARGUMENTS = {
    "as_tensor": ("_tensor_argument", 0), "as_tensors": ("_tensor_argument", 1),
    "as_nested_tensors": ("_tensor_argument", 2), "as_optional_tensor": ("_optional_tensor", 0),
    "as_optional_tensors": ("_optional_tensor", 1), "as_int": ("_int", 0), "as_ints": ("_int", 1),
    "as_int_lists": ("_int", 2), "as_float": ("_float", 0), "as_floats": ("_float", 1),
    "as_float_lists": ("_float", 2), "as_bool": ("_bool", 0), "as_bools": ("_bool", 1),
    "as_string": ("_string_argument", 0), "as_strings": ("_string_argument", 1),
}

# --- operators ------------------------------------------------------------------------------------------------------
# Pure tensor operators: their result depends only on their arguments, and they touch no file, no global state, no
# other process. Overloads of a listed packet are allowed (aten.add.Tensor, aten.add.Scalar), and so is the in-place
# form where torch has one (relu_): with no operator that reaches outside the process, in-place writes can only
# change the model's own intermediate tensors.
PURE_ATEN = frozenset("""
    abs absolute acos acosh adaptive_avg_pool1d adaptive_avg_pool2d adaptive_avg_pool3d adaptive_max_pool1d
    adaptive_max_pool2d adaptive_max_pool3d add addbmm addcdiv addcmul addmm addmv alias all amax amin any arange argmax
    argmin as_strided asin asinh atan atan2 atanh avg_pool1d avg_pool2d avg_pool3d baddbmm batch_norm bitwise_and
    bitwise_not bitwise_or bitwise_xor bmm broadcast_tensors bucketize cat ceil celu channel_shuffle chunk clamp
    clamp_max clamp_min clip clone col2im concat concatenate constant_pad_nd contiguous conv1d conv2d conv3d
    conv_transpose1d conv_transpose2d conv_transpose3d convolution copy cos cosh cumprod cumsum detach diag diagonal
    div dot dropout einsum elu embedding empty empty_like empty_strided eq erf erfc exp exp2 expand expand_as expm1
    eye feature_dropout fill flatten flip floor floor_divide fmod frac full full_like gather ge gelu glu group_norm gru
    gt hardsigmoid hardswish hardtanh im2col index index_add index_copy index_fill index_put index_select
    instance_norm isfinite isinf isnan layer_norm le leaky_relu lerp lift_fresh_copy linalg_vector_norm linear
    linspace log log10 log1p log2 log_sigmoid log_softmax logical_and logical_not logical_or logical_xor logit
    logsumexp lstm lt masked_fill masked_scatter masked_select matmul max max_pool1d max_pool2d
    max_pool2d_with_indices max_pool3d maximum mean median min minimum mish mm movedim mul multinomial_free mv
    nan_to_num narrow native_batch_norm native_dropout native_group_norm native_layer_norm ne neg new_empty
    new_empty_strided new_full new_ones new_zeros nonzero norm one_hot ones ones_like outer pad permute pixel_shuffle
    pixel_unshuffle pow prelu prod reciprocal reflection_pad1d reflection_pad2d relu relu6 remainder repeat
    repeat_interleave replication_pad1d replication_pad2d reshape rms_norm rnn_relu rnn_tanh roll round rsqrt rsub
    scalar_tensor scaled_dot_product_attention scatter scatter_add scatter_reduce select select_scatter selu sigmoid
    sign silu sin sinh slice slice_scatter softmax softplus sort split split_with_sizes sqrt square squeeze stack std
    std_mean sub sum t tan tanh tensor_split threshold tile to topk transpose tril triu true_divide trunc type_as unbind
    unflatten unfold unsqueeze upsample_bicubic2d upsample_bilinear2d upsample_linear1d upsample_nearest1d
    upsample_nearest2d upsample_nearest3d var var_mean view view_as where zeros zeros_like
    __and__ __or__ __xor__ _adaptive_avg_pool2d _assert_async _assert_scalar _assert_tensor_metadata _log_softmax
    _native_batch_norm_legit _native_batch_norm_legit_functional _native_batch_norm_legit_no_training
    _scaled_dot_product_flash_attention_for_cpu _softmax _to_copy _unsafe_view sym_constrain_range
    sym_constrain_range_for_size sym_numel sym_size sym_storage_offset sym_stride
""".split())
# Higher-order operators whose subgraphs are checked node by node like the main graph.
PURE_HIGHER_ORDER = frozenset({"cond", "while_loop", "map_impl", "scan", "wrap_with_set_grad_enabled",
                               "wrap_with_autocast"})
# Python operators that an export uses for symbolic sizes and for picking one output of a multi-output operator.
PYTHON_OPERATORS = frozenset(
    {f"_operator.{name}" for name in ("getitem", "add", "sub", "mul", "floordiv", "mod", "neg", "pos", "eq", "ne",
                                      "lt", "le", "gt", "ge", "truediv", "pow", "and_", "or_")}
    | {f"torch.{name}" for name in ("sym_max", "sym_min", "sym_not", "sym_float", "sym_int", "sym_ite", "sym_sqrt")}
    | {"math.trunc", "math.ceil", "math.floor"})
# Why some well-known refused operators are refused, for a clearer line than "not on the allow-list".
REFUSED_REASONS = (
    (re.compile(r"from_file|_load|load|save|storage|mmap|file|_pin_memory|share_memory"),
     "reads, writes or maps files or raw memory"),
    (re.compile(r"seed|rng|random_|set_|_print|print|record_stream|_set_|set_grad|_dirty"),
     "prints, seeds or changes global state"),
    (re.compile(r"rand|bernoulli|normal|uniform|poisson|multinomial|exponential|cauchy|geometric|log_normal"),
     "draws random numbers, so outputs would not repeat"),
)
DISTRIBUTED_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor", "c10d_functional")
TARGET = re.compile(r"^torch\.ops\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)(?:\.([A-Za-z0-9_]+))?$")


class ArchivePolicyError(AnalyzerError):
    """A `.pt2` archive breaks the policy: the one-line message names what and says how to re-export."""


@dataclass(frozen=True)
class CheckedArchive:
    """An archive that passed the policy: the bytes torch may load, and what the policy read on the way."""

    data: bytes
    root: str
    operators: tuple  # distinct operator targets, in the order first seen
    weight_bytes: int  # stored bytes of all weights and constants
    names: dict = None  # "class_names" / "feature_names" -> tuple of text, when the archive carries them


def sanitize_export_archive(data: bytes, name: str, *,
                            max_tensor_bytes: int = DEFAULT_MAX_TENSOR_BYTES) -> CheckedArchive:
    """Check the bytes of a `.pt2` file against the policy and return the archive torch may load.

    Raises `ArchivePolicyError` with one line naming the first problem found."""
    return _Checker(data, name, max_tensor_bytes).run()


class _Checker:
    def __init__(self, data: bytes, name: str, max_tensor_bytes: int):
        self.data = data
        self.name = name
        self.max_tensor_bytes = max_tensor_bytes
        self.operators: dict = {}

    def refuse(self, what: str, fix: str = EXPORT_ADVICE):
        raise ArchivePolicyError(f"{self.name!r} is refused: {what}; {fix}")

    # --- the zip ----------------------------------------------------------------------------------------------------
    def run(self) -> CheckedArchive:
        try:
            archive = zipfile.ZipFile(io.BytesIO(self.data))
            infos = archive.infolist()
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
            self.refuse(f"it is not a readable zip archive ({type(exc).__name__})")
        if len(infos) > MAX_MEMBERS:
            self.refuse(f"it has {len(infos)} members")
        names = [info.filename for info in infos]
        if len(set(names)) != len(names):
            duplicate = next(n for n in names if names.count(n) > 1)
            # zipfile reads the last of two same-named members, torch's reader may read the first: what we check
            # must be what torch loads
            self.refuse(f"member {duplicate!r} appears twice")
        if any(n.endswith("data.pkl") for n in names) and not any(n.endswith("archive_format") for n in names):
            self.refuse("it was written by torch.save, not torch.export.save, and pickles are never loaded")
        roots = set()
        for info in infos:
            self._check_member_name(info)
            roots.add(info.filename.split("/", 1)[0])
        if len(roots) != 1:
            self.refuse(f"its members sit under {len(roots)} top-level folders, not one")
        root = roots.pop()
        if not ROOT_NAME.match(root):
            self.refuse(f"its top-level folder {root!r} is not a plain name")
        members = {info.filename[len(root) + 1:]: info for info in infos if info.filename != root + "/"}
        for required in REQUIRED_MEMBERS:
            if required not in members:
                self.refuse(f"it has no {required} ({FIXED_MEMBERS[required]}), so it is not a torch.export archive")
        self.members, self.archive, self.root = members, archive, root

        fixed = {key: self._read_text(key, 256) for key in ("archive_format", "archive_version", "byteorder",
                                                             ".data/version", ".data/serialization_id")
                 if key in members}
        if fixed["archive_format"].strip() != "pt2":
            self.refuse(f"archive_format says {fixed['archive_format'][:20]!r}, not 'pt2'")
        if not re.fullmatch(r"[0-9]{1,3}", fixed["archive_version"].strip()):
            self.refuse("archive_version is not a number")
        if "byteorder" in fixed and fixed["byteorder"].strip() != "little":
            self.refuse(f"it was saved {fixed['byteorder'][:10]!r}-endian; only little-endian archives load here")
        for key in (".data/version", ".data/serialization_id"):
            if key in fixed and not re.fullmatch(r"[0-9A-Za-z_-]{0,64}", fixed[key].strip()):
                self.refuse(f"{key} is not a plain version string")

        program = self._read_json("models/model.json")
        weights = self._read_json("data/weights/model_weights_config.json")
        constants = self._read_json("data/constants/model_constants_config.json")
        clean_program = self._program(program)
        clean_weights, weight_files = self._payload_config(weights, "data/weights/model_weights_config.json",
                                                           WEIGHT_FILE, constants=False)
        clean_constants, constant_files = self._payload_config(
            constants, "data/constants/model_constants_config.json", TENSOR_CONSTANT_FILE, constants=True)
        referenced = {f"data/weights/{f}" for f in weight_files} | {f"data/constants/{f}" for f in constant_files}
        carried = {}
        for member in members:
            if member in FIXED_MEMBERS or member in referenced:
                continue
            if member in NAME_MEMBERS:
                carried[NAME_MEMBERS[member]] = self._names(member)
                continue
            for prefix, why in OPTIONAL_MEMBERS_REFUSED.items():
                if member.startswith(prefix):
                    self.refuse(f"member {member!r} is not allowed: {why}")
            if member.startswith("models/"):
                self.refuse(f"member {member!r} is a second exported program; one model per archive")
            self.refuse(f"member {member!r} is not part of a torch.export archive (nothing names it)")
        stored = self._check_payloads(clean_weights, clean_constants)
        return CheckedArchive(data=self._rebuild(clean_program, clean_weights, clean_constants, referenced),
                              root=root, operators=tuple(self.operators), weight_bytes=stored, names=carried)

    def _names(self, member: str) -> tuple:
        """A JSON list of distinct, non-empty names without control characters (text shown, never run)."""
        value = json.loads(self._read_text(member, MAX_NAMES_BYTES))
        if not isinstance(value, list) or not value or len(value) > MAX_NAMES or not all(
                isinstance(v, str) and 0 < len(v) <= MAX_NAME_CHARS and v.isprintable() for v in value):
            self.refuse(f"{member} is not a JSON list of names (1..{MAX_NAMES} printable texts of at most "
                        f"{MAX_NAME_CHARS} characters)", "save it with json.dumps(list_of_names)")
        if len(set(value)) != len(value):
            self.refuse(f"{member} names something twice", "give each class or feature one name")
        return tuple(value)

    def _check_member_name(self, info: zipfile.ZipInfo) -> None:
        name = info.filename
        if "\\" in name or "\x00" in name or name.startswith("/") or re.match(r"^[A-Za-z]:", name):
            self.refuse(f"member {name!r} has an absolute or Windows path")
        if any(part in ("..", ".") for part in name.split("/")) or "//" in name:
            self.refuse(f"member {name!r} climbs out of the archive ('..' in its path)")
        if name.count("/") == 0:
            self.refuse(f"member {name!r} is not inside the archive's folder")
        if info.flag_bits & 0x1:
            self.refuse(f"member {name!r} is encrypted")
        if info.compress_type != zipfile.ZIP_STORED:
            # torch.export.save stores members uncompressed, so declared sizes are the bytes present: no bomb
            self.refuse(f"member {name!r} is compressed; torch.export.save never compresses, so it was rebuilt by "
                        f"another tool")
        if info.file_size != info.compress_size or info.header_offset + info.file_size > len(self.data):
            self.refuse(f"member {name!r} declares {info.file_size} bytes that the file does not hold")

    def _read(self, member: str, limit: int) -> bytes:
        info = self.members[member]
        if info.file_size > limit:
            self.refuse(f"{member} is {info.file_size} bytes, over the {limit}-byte limit")
        try:
            return self.archive.read(info)
        except (zipfile.BadZipFile, OSError, ValueError, EOFError, RuntimeError) as exc:
            self.refuse(f"{member} cannot be read ({type(exc).__name__}: {str(exc)[:80]})")

    def _read_text(self, member: str, limit: int) -> str:
        try:
            return self._read(member, limit).decode("utf-8")
        except UnicodeDecodeError:
            self.refuse(f"{member} is not UTF-8 text")

    def _read_json(self, member: str):
        text = self._read_text(member, MAX_JSON_BYTES)

        def no_duplicates(pairs):
            keys = [k for k, _ in pairs]
            if len(set(keys)) != len(keys):
                self.refuse(f"{member} has a duplicate key {next(k for k in keys if keys.count(k) > 1)!r}")
            return dict(pairs)

        def no_constant(token):
            self.refuse(f"{member} holds {token}, which is not JSON")

        try:
            value = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constant)
        except ArchivePolicyError:
            raise
        except RecursionError:
            self.refuse(f"{member} is nested too deeply")
        except ValueError as exc:
            self.refuse(f"{member} is not valid JSON ({str(exc)[:80]})")
        if _depth(value) > MAX_JSON_DEPTH:
            self.refuse(f"{member} is nested more than {MAX_JSON_DEPTH} levels deep")
        return value

    # --- the exported program -----------------------------------------------------------------------------------------
    def _program(self, program) -> dict:
        where = "models/model.json"
        self._keys(program, where, required={"graph_module", "opset_version", "range_constraints", "schema_version"},
                   optional={"verifiers", "torch_version", "guards_code"})
        opset = self._dict(program["opset_version"], f"{where} opset_version")
        for namespace, version in opset.items():
            if namespace != "aten":
                self.refuse(f"opset_version names namespace {namespace!r}; only aten operators are allowed")
            self._int(version, f"opset_version.{namespace}")
        ranges = {}
        for symbol, bounds in self._dict(program["range_constraints"], "range_constraints").items():
            if not SYMBOL.match(symbol):
                self.refuse(f"range_constraints names {symbol[:40]!r}, which is not a symbol name")
            self._keys(bounds, f"range_constraints.{symbol}", required={"min_val", "max_val"})
            ranges[symbol] = {k: self._optional_int(bounds[k], f"range_constraints.{symbol}.{k}")
                              for k in ("min_val", "max_val")}
        version = program["schema_version"]
        self._keys(version, "schema_version", required={"major", "minor"})
        verifiers = [self._choice(v, VERIFIERS, "verifiers") for v in self._list(program.get("verifiers", []),
                                                                                  "verifiers")]
        torch_version = program.get("torch_version", "<=2.4")
        if not isinstance(torch_version, str) or not TORCH_VERSION.match(torch_version):
            self.refuse("torch_version is not a version string")
        for guard in self._list(program.get("guards_code", []), "guards_code"):
            # torch execs these strings as Python when the program is turned into a module. A program of several
            # inputs records that they share a batch size (L['mask'].size()[0] == L['ids'].size()[0]): one strict
            # form is recognised, and every guard is dropped from the rebuilt archive (they only check sizes)
            if not isinstance(guard, str) or not SIZE_GUARD.fullmatch(guard):
                self.refuse("guards_code holds Python source, which torch would execute",
                            "export without torch._check calls on input sizes, or with dynamic_shapes ranges only")
        return {"graph_module": self._graph_module(program["graph_module"]),
                "opset_version": dict(opset), "range_constraints": ranges,
                "schema_version": {"major": self._int(version["major"], "schema_version.major"),
                                   "minor": self._int(version["minor"], "schema_version.minor")},
                "verifiers": verifiers, "torch_version": torch_version, "guards_code": []}

    def _graph_module(self, gm) -> dict:
        where = "graph_module"
        self._keys(gm, where, required={"graph", "signature", "module_call_graph"},
                   optional={"metadata", "treespec_namedtuple_fields"})
        if self._dict(gm.get("treespec_namedtuple_fields", {}), "treespec_namedtuple_fields"):
            self.refuse("treespec_namedtuple_fields is not empty: the model returns named tuples",
                        "wrap the model so forward returns one logits tensor, then export it")
        # graph_module.metadata only carries free-form annotations ("custom"); nothing needs them to run
        self._dict(gm.get("metadata", {}), "graph_module.metadata")
        return {"graph": self._graph(gm["graph"], "graph"), "signature": self._signature(gm["signature"]),
                "module_call_graph": [self._module_call(e, i) for i, e in
                                      enumerate(self._list(gm["module_call_graph"], "module_call_graph"))],
                "metadata": {}, "treespec_namedtuple_fields": {}}

    def _graph(self, graph, where: str) -> dict:
        self._keys(graph, where, required={"inputs", "outputs", "nodes", "tensor_values"},
                   optional={"sym_int_values", "sym_bool_values", "sym_float_values", "custom_obj_values",
                             "is_single_tensor_return"})
        if self._dict(graph.get("custom_obj_values", {}), f"{where}.custom_obj_values"):
            self.refuse(f"{where}.custom_obj_values declares custom-class (torchbind) objects, which run native code "
                        f"of their own", "export a model made of plain tensor operators")
        out = {
            "inputs": [self._argument(a, f"{where}.inputs") for a in self._list(graph["inputs"], f"{where}.inputs")],
            "outputs": [self._argument(a, f"{where}.outputs") for a in self._list(graph["outputs"],
                                                                                   f"{where}.outputs")],
            "nodes": [self._node(n, f"{where}.nodes[{i}]") for i, n in enumerate(self._list(graph["nodes"],
                                                                                              f"{where}.nodes"))],
            "tensor_values": {self._identifier(k, f"{where}.tensor_values"): self._tensor_meta(v, f"tensor {k}")
                              for k, v in self._dict(graph["tensor_values"], f"{where}.tensor_values").items()},
            "sym_int_values": {self._identifier(k, f"{where}.sym_int_values"): self._sym(v, "as_int", f"symint {k}")
                               for k, v in self._dict(graph.get("sym_int_values", {}), where).items()},
            "sym_bool_values": {self._identifier(k, f"{where}.sym_bool_values"): self._sym(v, "as_bool",
                                                                                           f"symbool {k}")
                                for k, v in self._dict(graph.get("sym_bool_values", {}), where).items()},
            "sym_float_values": {self._identifier(k, f"{where}.sym_float_values"): self._sym(v, "as_float",
                                                                                             f"symfloat {k}")
                                 for k, v in self._dict(graph.get("sym_float_values", {}), where).items()},
            "custom_obj_values": {},
            "is_single_tensor_return": self._bool(graph.get("is_single_tensor_return", False),
                                                  f"{where}.is_single_tensor_return"),
        }
        return out

    def _node(self, node, where: str) -> dict:
        self._keys(node, where, required={"target", "inputs", "outputs"},
                   optional={"metadata", "is_hop_single_tensor_return", "name"})
        target = self._operator(node["target"], where)
        clean = {"target": target,
                 "inputs": [self._named_argument(a, f"{where} ({target})")
                            for a in self._list(node["inputs"], f"{where}.inputs")],
                 "outputs": [self._argument(a, f"{where} ({target}) outputs")
                             for a in self._list(node["outputs"], f"{where}.outputs")],
                 "metadata": self._node_metadata(node.get("metadata", {}), where)}
        hop = node.get("is_hop_single_tensor_return")
        clean["is_hop_single_tensor_return"] = None if hop is None else self._bool(hop, where)
        if node.get("name") is not None:
            clean["name"] = self._identifier(node["name"], f"{where}.name")
        return clean

    def _operator(self, target, where: str) -> str:
        if not isinstance(target, str) or len(target) > 200:
            self.refuse(f"{where} has a target that is not an operator name")
        if target in PYTHON_OPERATORS:
            self.operators.setdefault(target, None)
            return target
        match = TARGET.match(target)
        if not match:
            self.refuse(f"{where} calls {target[:80]!r}, which is not a torch operator on the allow-list")
        namespace, packet, _overload = match.groups()
        if namespace in DISTRIBUTED_NAMESPACES:
            self.refuse(f"{where} calls {target}, a distributed/collective operator",
                        "export the model for a single process")
        if namespace == "higher_order":
            if packet not in PURE_HIGHER_ORDER:
                self.refuse(f"{where} calls higher-order operator {target}, which is not on the allow-list")
        elif namespace != "aten":
            self.refuse(f"{where} calls {target} from namespace {namespace!r}; only aten operators are allowed "
                        f"(custom operators run code that is not part of the archive)")
        else:
            base = packet[:-1] if packet.endswith("_") and not packet.startswith("_") else packet
            if packet not in PURE_ATEN and base not in PURE_ATEN:
                reason = next((why for pattern, why in REFUSED_REASONS if pattern.search(packet)), None)
                self.refuse(f"{where} calls {target}" + (f", which {reason}" if reason else
                                                         ", which is not on the allow-list of pure tensor operators"))
        self.operators.setdefault(target, None)
        return target

    def _node_metadata(self, metadata, where: str) -> dict:
        # Only nn_module_stack is kept: unflatten rebuilds the module tree from it. Stack traces, source-function
        # stacks and custom annotations are dropped, so no string torch might resolve survives.
        metadata = self._dict(metadata, f"{where}.metadata")
        stack = metadata.get("nn_module_stack")
        if stack is None:
            return {}
        if not isinstance(stack, str) or len(stack) > 20_000:
            self.refuse(f"{where}.metadata.nn_module_stack is not a module stack")
        for item in stack.split(";"):
            parts = _split_top_level(item)
            if len(parts) != 3:
                self.refuse(f"{where}.metadata.nn_module_stack entry {item[:60]!r} is not key,path,type")
            key, path, kind = parts
            if not MODULE_STACK_PART.match(key) or not MODULE_STACK_PART.match(path) or not MODULE_TYPE.match(kind):
                self.refuse(f"{where}.metadata.nn_module_stack entry {item[:60]!r} holds unexpected characters")
        return {"nn_module_stack": stack}

    # --- arguments ----------------------------------------------------------------------------------------------------
    def _named_argument(self, named, where: str) -> dict:
        self._keys(named, where, required={"name", "arg"}, optional={"kind"})
        name = named["name"]
        if not isinstance(name, str) or (name and not IDENTIFIER.match(name)):
            self.refuse(f"{where} has an argument name that is not an identifier")
        clean = {"name": name, "arg": self._argument(named["arg"], f"{where} argument {name or '?'}")}
        if named.get("kind") is not None:
            clean["kind"] = self._int(named["kind"], where)
        return clean

    def _argument(self, arg, where: str) -> dict:
        kind, value = self._union(arg, where)
        if kind == "as_none":
            return {kind: True}
        if kind in NESTED_ARGUMENTS:
            checker, depth = NESTED_ARGUMENTS[kind]
            return {kind: self._nested(value, depth, getattr(self, checker), where)}
        if kind in ("as_sym_int", "as_sym_bool", "as_sym_float"):
            return {kind: self._sym_argument(value, kind, where)}
        if kind in ("as_sym_ints", "as_sym_bools", "as_sym_floats"):
            return {kind: [self._sym_argument(v, kind[:-1], where) for v in self._list(value, where)]}
        if kind == "as_scalar_type":
            return {kind: self._choice(value, set(ELEMENT_BYTES), where)}
        if kind == "as_memory_format":
            return {kind: self._choice(value, MEMORY_FORMATS, where)}
        if kind == "as_layout":
            return {kind: self._choice(value, LAYOUTS, where)}
        if kind == "as_device":
            return {kind: self._device(value, where)}
        if kind == "as_graph":
            self._keys(value, where, required={"name", "graph"})
            sub = self._identifier(value["name"], where)
            return {kind: {"name": sub, "graph": self._graph(value["graph"], f"subgraph {sub}")}}
        if kind == "as_operator":
            return {kind: self._operator(value, where)}
        if kind == "as_complex":
            self._keys(value, where, required={"real", "imag"})
            return {kind: {"real": self._float(value["real"], where), "imag": self._float(value["imag"], where)}}
        if kind == "as_custom_obj":
            self.refuse(f"{where} passes a custom-class (torchbind) object, which runs native code of its own",
                        "export a model made of plain tensor operators")
        if kind == "as_string_to_argument":
            self.refuse(f"{where} passes a string-keyed argument map, which plain models never need")
        self.refuse(f"{where} holds an argument of unknown kind {kind[:40]!r}")

    def _union(self, value, where: str) -> tuple:
        if not isinstance(value, dict) or len(value) != 1:
            self.refuse(f"{where} is not a single-field value")
        kind, inner = next(iter(value.items()))
        return kind, inner

    def _nested(self, value, depth: int, check, where: str):
        """`value` checked by `check`, or a list (depth 1) or list of lists (depth 2) of such values."""
        if depth == 0:
            return check(value, where)
        return [self._nested(v, depth - 1, check, where) for v in self._list(value, where)]

    def _tensor_argument(self, value, where: str) -> dict:
        self._keys(value, where, required={"name"})
        return {"name": self._identifier(value["name"], where)}

    def _optional_tensor(self, value, where: str) -> dict:
        kind, inner = self._union(value, where)
        if kind == "as_none":
            return {"as_none": True}
        if kind == "as_tensor":
            return {"as_tensor": self._tensor_argument(inner, where)}
        self.refuse(f"{where} holds an optional tensor of unknown kind {kind[:40]!r}")

    def _sym_argument(self, value, kind: str, where: str) -> dict:
        literal = {"as_sym_int": "as_int", "as_sym_bool": "as_bool", "as_sym_float": "as_float"}[kind]
        inner_kind, inner = self._union(value, where)
        if inner_kind == "as_name":
            return {"as_name": self._identifier(inner, where)}
        if inner_kind == literal:
            return {literal: self._literal(literal, inner, where)}
        self.refuse(f"{where} holds a symbolic value of unknown kind {inner_kind[:40]!r}")

    def _literal(self, kind: str, value, where: str):
        """A literal of kind "as_int", "as_bool" or "as_float", checked."""
        return {"as_int": self._int, "as_bool": self._bool, "as_float": self._float}[kind](value, where)

    def _string_argument(self, value, where: str) -> str:
        if not isinstance(value, str) or not STRING_ARGUMENT.match(value):
            self.refuse(f"{where} passes a string that is not short printable text")
        return value

    # --- symbolic values and the expression grammar --------------------------------------------------------------------
    def _sym(self, value, literal: str, where: str) -> dict:
        kind, inner = self._union(value, where)
        if kind == literal:
            return {literal: self._literal(literal, inner, where)}
        if kind != "as_expr":
            self.refuse(f"{where} holds a symbolic value of unknown kind {kind[:40]!r}")
        self._keys(inner, where, required={"expr_str"}, optional={"hint"})
        clean = {"expr_str": self._expression(inner["expr_str"], where)}
        if inner.get("hint") is not None:
            hint_kind, hint = self._union(inner["hint"], f"{where} hint")
            if hint_kind not in ("as_int", "as_bool", "as_float"):
                self.refuse(f"{where} has a hint of unknown kind {hint_kind[:40]!r}")
            clean["hint"] = {hint_kind: self._literal(hint_kind, hint, where)}
        else:
            clean["hint"] = None
        return {"as_expr": clean}

    def _expression(self, text, where: str) -> str:
        if not isinstance(text, str):
            self.refuse(f"{where} has an expression that is not text")
        try:
            parse_size_expression(text)
        except ValueError as exc:
            self.refuse(f"{where} has expression {text[:60]!r}, which is outside the size grammar ({exc})",
                        "sizes may only combine symbols and integers with + - * //, Mod, Max, Min and FloorDiv")
        return text

    # --- tensors -------------------------------------------------------------------------------------------------------
    def _tensor_meta(self, meta, where: str, *, static: bool = False) -> dict:
        self._keys(meta, where, required={"dtype", "sizes", "requires_grad", "device", "strides", "storage_offset",
                                          "layout"})
        dtype = self._choice(meta["dtype"], set(ELEMENT_BYTES), f"{where} dtype")
        sizes = [self._sym(s, "as_int", f"{where} size") for s in self._list(meta["sizes"], f"{where} sizes")]
        strides = [self._sym(s, "as_int", f"{where} stride") for s in self._list(meta["strides"], f"{where} strides")]
        offset = self._sym(meta["storage_offset"], "as_int", f"{where} storage offset")
        if static and not all("as_int" in v for v in (*sizes, *strides, offset)):
            self.refuse(f"{where} has a symbolic size; stored tensors have fixed sizes")
        numel = 1
        for size in sizes:
            value = size["as_int"] if "as_int" in size else (size["as_expr"].get("hint") or {}).get("as_int", 1)
            if not isinstance(value, int) or value < 0:
                self.refuse(f"{where} declares a negative or unknown size")
            numel *= value
        if numel * ELEMENT_BYTES[dtype] > self.max_tensor_bytes:
            self.refuse(f"{where} declares {numel} elements ({numel * ELEMENT_BYTES[dtype]} bytes), over the "
                        f"{self.max_tensor_bytes}-byte memory cap")
        return {"dtype": dtype, "sizes": sizes, "requires_grad": self._bool(meta["requires_grad"], where),
                "device": self._device(meta["device"], where), "strides": strides, "storage_offset": offset,
                "layout": self._choice(meta["layout"], LAYOUTS, f"{where} layout")}

    def _device(self, device, where: str) -> dict:
        self._keys(device, f"{where} device", required={"type"}, optional={"index"})
        return {"type": self._choice(device["type"], DEVICES, f"{where} device"),
                "index": self._optional_int(device.get("index"), f"{where} device index")}

    def _payload_config(self, config, where: str, file_pattern, *, constants: bool) -> tuple[dict, set]:
        self._keys(config, where, required={"config"})
        clean, files = {}, set()
        for fqn, meta in self._dict(config["config"], f"{where} config").items():
            if not isinstance(fqn, str) or not FQN.match(fqn):
                self.refuse(f"{where} names {str(fqn)[:60]!r}, which is not a module path")
            entry = f"{where} entry {fqn!r}"
            self._keys(meta, entry, required={"path_name", "is_param", "use_pickle", "tensor_meta"})
            path_name = meta["path_name"]
            if meta["use_pickle"] is not False:
                self.refuse(f"{entry} is stored as a pickle, which would run code on load",
                            "export with plain tensor weights (no tensor subclasses)")
            if constants and isinstance(path_name, str) and path_name.startswith("opaque_obj_"):
                self.refuse(f"{entry} is an opaque object, which torch unpickles",
                            "export a model made of plain tensor operators")
            if constants and isinstance(path_name, str) and path_name.startswith("custom_obj_"):
                self.refuse(f"{entry} is a custom-class (torchbind) object, which runs native code on load",
                            "export a model made of plain tensor operators")
            if not isinstance(path_name, str) or not file_pattern.match(path_name):
                self.refuse(f"{entry} points at {str(path_name)[:60]!r}, which is not a tensor file name")
            if meta["tensor_meta"] is None:
                self.refuse(f"{entry} has no tensor metadata")
            clean[fqn] = {"path_name": path_name, "is_param": self._bool(meta["is_param"], entry),
                          "use_pickle": False, "tensor_meta": self._tensor_meta(meta["tensor_meta"], entry,
                                                                                static=True)}
            files.add(path_name)
        return {"config": clean}, files

    def _check_payloads(self, weights: dict, constants: dict) -> int:
        stored_total = 0
        seen = set()
        for folder, config in (("data/weights", weights), ("data/constants", constants)):
            for fqn, meta in config["config"].items():
                member = f"{folder}/{meta['path_name']}"
                if member not in self.members:
                    self.refuse(f"{fqn!r} is stored in {member}, which the archive does not hold")
                tensor = meta["tensor_meta"]
                element = ELEMENT_BYTES[tensor["dtype"]]
                sizes = [s["as_int"] for s in tensor["sizes"]]
                strides = [s["as_int"] for s in tensor["strides"]]
                offset = tensor["storage_offset"]["as_int"]
                if len(sizes) != len(strides) or any(s < 0 for s in strides) or offset < 0:
                    self.refuse(f"{fqn!r} has strides or an offset that do not fit its sizes")
                numel = 1
                for size in sizes:
                    numel *= size
                needed = 0 if numel == 0 else (offset + sum((n - 1) * s for n, s in zip(sizes, strides)) + 1) * element
                stored = self.members[member].file_size
                if stored % element:
                    self.refuse(f"{member} holds {stored} bytes, not a whole number of {element}-byte elements")
                if stored < needed or (numel > 0 and stored == 0):
                    self.refuse(f"{fqn!r} declares {numel} elements ({needed} bytes) but {member} stores {stored}: "
                                f"the archive was edited or truncated")
                if member not in seen:
                    seen.add(member)
                    stored_total += stored
                    with self.archive.open(self.members[member]) as fh:
                        if fh.read(4) == ZIP_MAGIC:
                            self.refuse(f"{member} holds a zip archive, not tensor bytes")
        if stored_total > self.max_tensor_bytes:
            self.refuse(f"its weights take {stored_total} bytes, over the {self.max_tensor_bytes}-byte memory cap")
        return stored_total

    # --- signature and module call graph ----------------------------------------------------------------------------
    def _signature(self, signature) -> dict:
        self._keys(signature, "signature", required={"input_specs", "output_specs"})
        inputs, outputs = [], []
        for spec in self._list(signature["input_specs"], "signature.input_specs"):
            kind, value = self._union(spec, "signature.input_specs")
            where = f"signature input {kind}"
            if kind == "user_input":
                self._keys(value, where, required={"arg"})
                inputs.append({kind: {"arg": self._argument(value["arg"], where)}})
            elif kind in ("parameter", "buffer", "tensor_constant"):
                field = {"parameter": "parameter_name", "buffer": "buffer_name",
                         "tensor_constant": "tensor_constant_name"}[kind]
                self._keys(value, where, required={"arg", field}, optional={"persistent"})
                entry = {"arg": self._tensor_argument(value["arg"], where), field: self._fqn(value[field], where)}
                if kind == "buffer":
                    entry["persistent"] = self._bool(value.get("persistent", True), where)
                inputs.append({kind: entry})
            elif kind == "constant_input":
                self._keys(value, where, required={"name", "value"})
                const_kind, const = self._union(value["value"], where)
                checkers = {"as_none": lambda v, w: True, "as_int": self._int, "as_float": self._float,
                            "as_bool": self._bool, "as_string": self._string_argument}
                if const_kind not in checkers:
                    self.refuse(f"{where} has a constant of unknown kind {const_kind[:40]!r}")
                inputs.append({kind: {"name": self._identifier(value["name"], where),
                                      "value": {const_kind: checkers[const_kind](const, where)}}})
            elif kind == "custom_obj":
                self.refuse("the program takes a custom-class (torchbind) object as input, which runs native code",
                            "export a model made of plain tensor operators")
            else:
                self.refuse(f"the program has an input of kind {kind[:40]!r}, which plain models do not have")
        for spec in self._list(signature["output_specs"], "signature.output_specs"):
            kind, value = self._union(spec, "signature.output_specs")
            where = f"signature output {kind}"
            if kind == "user_output":
                self._keys(value, where, required={"arg"})
                outputs.append({kind: {"arg": self._argument(value["arg"], where)}})
            elif kind == "buffer_mutation":
                self._keys(value, where, required={"arg", "buffer_name"})
                outputs.append({kind: {"arg": self._tensor_argument(value["arg"], where),
                                       "buffer_name": self._fqn(value["buffer_name"], where)}})
            else:
                self.refuse(f"the program has an output of kind {kind[:40]!r}",
                            "export the model for inference (model.eval(), no loss or gradients)")
        return {"input_specs": inputs, "output_specs": outputs}

    def _module_call(self, entry, index: int) -> dict:
        where = f"module_call_graph[{index}]"
        self._keys(entry, where, required={"fqn"}, optional={"signature"})
        clean = {"fqn": self._fqn(entry["fqn"], where), "signature": None}
        signature = entry.get("signature")
        if signature is not None:
            self._keys(signature, where, required={"inputs", "outputs", "in_spec", "out_spec"},
                       optional={"forward_arg_names"})
            names = signature.get("forward_arg_names")
            clean["signature"] = {
                "inputs": [self._argument(a, where) for a in self._list(signature["inputs"], where)],
                "outputs": [self._argument(a, where) for a in self._list(signature["outputs"], where)],
                "in_spec": self._treespec(signature["in_spec"], f"{where} in_spec"),
                "out_spec": self._treespec(signature["out_spec"], f"{where} out_spec"),
                "forward_arg_names": None if names is None else [self._identifier(n, where)
                                                                 for n in self._list(names, where)],
            }
        return clean

    def _treespec(self, text, where: str) -> str:
        # treespec_loads imports the module named by an {"__enum__": ..., "fqn": "module:attr"} context; only
        # built-in containers with plain-JSON contexts are accepted.
        if not isinstance(text, str) or len(text) > 1_000_000:
            self.refuse(f"{where} is not a tree spec")
        try:
            protocol, spec = json.loads(text)
        except (ValueError, TypeError):
            self.refuse(f"{where} is not a tree spec")
        if protocol != 1:
            self.refuse(f"{where} uses tree-spec protocol {str(protocol)[:10]}, not 1")
        self._treespec_node(spec, where, 0)
        return json.dumps([1, spec])

    def _treespec_node(self, node, where: str, depth: int) -> None:
        if depth > MAX_JSON_DEPTH:
            self.refuse(f"{where} is nested too deeply")
        if not isinstance(node, dict) or set(node) != {"type", "context", "children_spec"}:
            self.refuse(f"{where} is not a tree spec")
        kind, context, children = node["type"], node["context"], node["children_spec"]
        allowed = {None, "builtins.tuple", "builtins.list", "builtins.dict", "collections.OrderedDict"}
        if kind not in allowed:
            self.refuse(f"{where} names container type {str(kind)[:60]!r}; only tuples, lists and dicts are allowed",
                        "wrap the model so forward takes one tensor and returns one tensor (a transformers "
                        "model: call it with return_dict=False and return the logits, as the README shows)")
        if context is not None:
            if not isinstance(context, str):
                self.refuse(f"{where} has a tree-spec context that is not text")
            try:
                value = json.loads(context)
            except ValueError:
                self.refuse(f"{where} has a tree-spec context that is not JSON")
            if value is not None and not (isinstance(value, list) and all(
                    isinstance(v, (str, int)) and not isinstance(v, bool) for v in value)):
                self.refuse(f"{where} has a tree-spec context other than a list of keys (an enum or object, which "
                            f"torch would import)")
        if not isinstance(children, list):
            self.refuse(f"{where} is not a tree spec")
        for child in children:
            self._treespec_node(child, where, depth + 1)

    # --- scalars ---------------------------------------------------------------------------------------------------
    def _keys(self, value, where: str, *, required: set, optional: set = frozenset()) -> None:
        if not isinstance(value, dict):
            self.refuse(f"{where} is not an object")
        missing = required - set(value)
        extra = set(value) - required - set(optional)
        if missing:
            self.refuse(f"{where} lacks {', '.join(sorted(missing))}")
        if extra:
            self.refuse(f"{where} has unexpected field {sorted(extra)[0][:60]!r}")

    def _dict(self, value, where: str) -> dict:
        if not isinstance(value, dict):
            self.refuse(f"{where} is not an object")
        return value

    def _list(self, value, where: str) -> list:
        if not isinstance(value, list):
            self.refuse(f"{where} is not a list")
        return value

    def _int(self, value, where: str) -> int:
        if not isinstance(value, int) or isinstance(value, bool) or abs(value) >= 1 << 63:
            self.refuse(f"{where} holds {str(value)[:30]!r} where a 64-bit integer belongs")
        return value

    def _optional_int(self, value, where: str):
        return None if value is None else self._int(value, where)

    def _float(self, value, where: str) -> float:
        if isinstance(value, str) and value in ("Infinity", "-Infinity", "NaN"):
            return value  # torch serialises non-finite floats as these strings
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            self.refuse(f"{where} holds {str(value)[:30]!r} where a number belongs")
        return value

    def _bool(self, value, where: str) -> bool:
        if not isinstance(value, bool):
            self.refuse(f"{where} holds {str(value)[:30]!r} where true or false belongs")
        return value

    def _choice(self, value, allowed, where: str):
        if isinstance(value, bool) or value not in allowed:
            self.refuse(f"{where} holds {str(value)[:30]!r}, not one of the known values")
        return value

    def _identifier(self, value, where: str) -> str:
        if not isinstance(value, str) or not IDENTIFIER.match(value):
            self.refuse(f"{where} has a name {str(value)[:60]!r} that is not an identifier")
        return value

    def _fqn(self, value, where: str) -> str:
        if not isinstance(value, str) or not FQN.match(value):
            self.refuse(f"{where} has a module path {str(value)[:60]!r} with unexpected characters")
        return value

    # --- the archive torch loads ---------------------------------------------------------------------------------------
    def _rebuild(self, program: dict, weights: dict, constants: dict, referenced: set) -> bytes:
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", compression=zipfile.ZIP_STORED) as new:
            def put(member: str, data: bytes) -> None:
                info = zipfile.ZipInfo(f"{self.root}/{member}", date_time=(1980, 1, 1, 0, 0, 0))
                new.writestr(info, data, compress_type=zipfile.ZIP_STORED)

            for member in ("archive_format", "archive_version", "byteorder", ".data/version",
                           ".data/serialization_id"):
                if member in self.members:
                    put(member, self._read(member, 256))
            put("models/model.json", json.dumps(program).encode())
            put("data/weights/model_weights_config.json", json.dumps(weights).encode())
            put("data/constants/model_constants_config.json", json.dumps(constants).encode())
            # Sample inputs are a pickle: an empty record makes torch skip them (ExportedProgramDeserializer)
            put("data/sample_inputs/model.pt", b"")
            for member in sorted(referenced):
                with self.archive.open(self.members[member]) as src:
                    put(member, src.read())
        return out.getvalue()


def _split_top_level(text: str) -> list:
    # the deserializer's own rule: commas inside brackets or parentheses do not split
    out, start, depth = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "[(":
            depth += 1
        elif ch in ")]":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(text[start:i])
            start = i + 1
    out.append(text[start:])
    return out


def _depth(value, limit: int = MAX_JSON_DEPTH + 1) -> int:
    stack, deepest = [(value, 1)], 0
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        if isinstance(item, dict):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list):
            stack.extend((v, depth + 1) for v in item)
    return deepest


# --- the size-expression grammar ------------------------------------------------------------------------------------
# expr   := term (("+" | "-") term)*
# term   := unary (("*" | "//") unary)*
# unary  := "-" unary | atom
# atom   := INTEGER | SYMBOL | "(" expr ")" | call
# call   := ("Add" | "Mul" | "Max" | "Min") "(" expr ("," expr)+ ")"
#         | ("Mod" | "FloorDiv" | "PythonMod") "(" expr "," expr ")"
#         | "Integer" "(" ["-"] INTEGER ")"
#         | "Symbol" "(" "'" SYMBOL "'" ("," ASSUMPTION "=" ("True" | "False"))* ")"
# torch writes sizes in sympy's srepr form (`Mul(Integer(16), Symbol('s77', positive=True, integer=True))`); older
# exports wrote infix (`16*s77`). Nothing else is accepted, so sympify, which evaluates its input as Python, only
# ever sees these names.
_TOKEN = re.compile(r"\s*(?:(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)|(?P<str>'[^']*')|(?P<op>//|[-+*(),=]))")
_VARIADIC = {"Add", "Mul", "Max", "Min"}
_BINARY = {"Mod", "FloorDiv", "PythonMod"}
_ASSUMPTIONS = {"positive", "integer", "nonnegative", "real", "finite", "extended_real", "nonzero", "zero"}


def parse_size_expression(text: str) -> None:
    """Raise ValueError unless `text` is a symbolic size in the grammar above."""
    if len(text) > MAX_EXPR_CHARS:
        raise ValueError(f"longer than {MAX_EXPR_CHARS} characters")
    tokens, pos = [], 0
    while pos < len(text):
        if text[pos:].strip() == "":
            break
        match = _TOKEN.match(text, pos)
        if not match:
            raise ValueError(f"unexpected character {text[pos:pos + 1]!r}")
        kind = match.lastgroup
        tokens.append((kind, match.group(kind)))
        pos = match.end()
    parser = _ExprParser(tokens)
    parser.expr(0)
    if parser.i != len(tokens):
        raise ValueError(f"unexpected {tokens[parser.i][1]!r}")


class _ExprParser:
    def __init__(self, tokens):
        self.tokens, self.i = tokens, 0

    def peek(self):
        return self.tokens[self.i] if self.i < len(self.tokens) else (None, None)

    def take(self, value=None, kind=None):
        tok_kind, tok = self.peek()
        if tok_kind is None or (value is not None and tok != value) or (kind is not None and tok_kind != kind):
            raise ValueError(f"expected {value or kind}, found {tok!r}")
        self.i += 1
        return tok

    def expr(self, depth: int) -> None:
        if depth > 60:
            raise ValueError("nested too deeply")
        self.term(depth)
        while self.peek()[1] in ("+", "-"):
            self.i += 1
            self.term(depth)

    def term(self, depth: int) -> None:
        self.unary(depth)
        while self.peek()[1] in ("*", "//"):
            self.i += 1
            self.unary(depth)

    def unary(self, depth: int) -> None:
        if self.peek()[1] == "-":
            self.i += 1
            self.unary(depth + 1)
            return
        self.atom(depth)

    def integer(self) -> None:
        if len(self.take(kind="int")) > MAX_INT_DIGITS:
            raise ValueError(f"an integer longer than {MAX_INT_DIGITS} digits")

    def atom(self, depth: int) -> None:
        kind, tok = self.peek()
        if kind == "int":
            self.integer()
        elif tok == "(":
            self.i += 1
            self.expr(depth + 1)
            self.take(")")
        elif kind == "name" and tok in _VARIADIC | _BINARY:
            self.i += 1
            self.take("(")
            self.expr(depth + 1)
            count = 1
            while self.peek()[1] == ",":
                self.i += 1
                self.expr(depth + 1)
                count += 1
            self.take(")")
            if (tok in _BINARY and count != 2) or (tok in _VARIADIC and count < 2):
                raise ValueError(f"{tok} with {count} arguments")
        elif kind == "name" and tok == "Integer":
            self.i += 1
            self.take("(")
            if self.peek()[1] == "-":
                self.i += 1
            self.integer()
            self.take(")")
        elif kind == "name" and tok == "Symbol":
            self.i += 1
            self.take("(")
            name = self.take(kind="str")[1:-1]
            if not SYMBOL.match(name):
                raise ValueError(f"symbol name {name[:20]!r}")
            while self.peek()[1] == ",":
                self.i += 1
                if self.take(kind="name") not in _ASSUMPTIONS:
                    raise ValueError("an unknown symbol assumption")
                self.take("=")
                if self.take(kind="name") not in ("True", "False"):
                    raise ValueError("an assumption that is not True or False")
            self.take(")")
        elif kind == "name" and SYMBOL.match(tok):
            self.i += 1
        else:
            raise ValueError(f"unexpected {tok!r}")
