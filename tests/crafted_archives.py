"""Hostile `.pt2` archives, each hand-built from a real `torch.export` file by editing its JSON as an attacker would.

`CRAFTED[name](base_bytes, marker_path, victim_path) -> bytes` builds one; the payloads create `marker_path` or
overwrite `victim_path` if anything ever runs them. `EXPECTED[name]` is a fragment of the one-line refusal.
"""
from __future__ import annotations

import io
import json
import pickle
import zipfile


def members(data: bytes) -> tuple[str, dict]:
    archive = zipfile.ZipFile(io.BytesIO(data))
    root = archive.namelist()[0].split("/", 1)[0]
    return root, {info.filename[len(root) + 1:]: archive.read(info) for info in archive.infolist()}


def build(root: str, content: dict, *, extra: list | None = None, compress: set | None = None) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for name, data in list(content.items()) + list(extra or []):
            method = zipfile.ZIP_DEFLATED if compress and name in compress else zipfile.ZIP_STORED
            archive.writestr(zipfile.ZipInfo(f"{root}/{name}" if not name.startswith("/") else name), data,
                             compress_type=method)
    return out.getvalue()


def edit_json(data: bytes, member: str, change) -> bytes:
    root, content = members(data)
    value = json.loads(content[member])
    change(value)
    content[member] = json.dumps(value).encode()
    return build(root, content)


def program(change):
    return lambda data, marker, victim: edit_json(data, "models/model.json", lambda p: change(p, marker, victim))


def python_payload(marker) -> str:
    return f"0*__import__('os').system('touch {marker}') + s77"


def _first_symbolic_size(p):
    for meta in p["graph_module"]["graph"]["tensor_values"].values():
        for size in meta["sizes"]:
            if "as_expr" in size:
                return size
    raise AssertionError("the base export has no symbolic size")


def _expr_in_size(p, marker, victim):
    _first_symbolic_size(p)["as_expr"]["expr_str"] = python_payload(marker)


def _expr_in_stride(p, marker, victim):
    meta = next(iter(p["graph_module"]["graph"]["tensor_values"].values()))
    meta["strides"][0] = {"as_expr": {"expr_str": python_payload(marker), "hint": {"as_int": 1}}}


def _expr_in_sym_int(p, marker, victim):
    p["graph_module"]["graph"]["sym_int_values"]["sym_size_int_9"] = {
        "as_expr": {"expr_str": f"Symbol('s77') + __import__('os').system('touch {marker}')", "hint": None}}


def _range_constraint_key(p, marker, victim):
    p["range_constraints"][f"__import__('os').system('touch {marker}')"] = {"min_val": 0, "max_val": None}


def _guards_code(p, marker, victim):
    p["guards_code"] = [f"__import__('os').system('touch {marker}') or True"]


def _size_guard_with_payload(p, marker, victim):
    # the one guard form a program of two inputs records, with Python after it
    p["guards_code"] = [f"L['x'].size()[0] == L['x'].size()[0] and __import__('os').system('touch {marker}')"]


def _treespec_enum(p, marker, victim):
    entry = p["graph_module"]["module_call_graph"][0]["signature"]
    entry["in_spec"] = json.dumps([1, {"type": "builtins.dict", "context": json.dumps(
        [{"__enum__": True, "fqn": "os:system", "name": "x"}]), "children_spec": []}])


def _treespec_type(p, marker, victim):
    entry = p["graph_module"]["module_call_graph"][0]["signature"]
    entry["out_spec"] = json.dumps([1, {"type": "subprocess.Popen", "context": "null", "children_spec": []}])


def _node_target(target):
    def change(p, marker, victim):
        p["graph_module"]["graph"]["nodes"][0]["target"] = target
    return change


def _from_file_then_fill(p, marker, victim):
    graph = p["graph_module"]["graph"]
    graph["nodes"].insert(0, {
        "target": "torch.ops.aten.from_file.default",
        "inputs": [{"name": "filename", "arg": {"as_string": str(victim)}, "kind": 1},
                   {"name": "shared", "arg": {"as_bool": True}, "kind": 1},
                   {"name": "size", "arg": {"as_int": 4}, "kind": 1}],
        "outputs": [{"as_tensor": {"name": "mapped"}}], "metadata": {}, "name": "mapped"})
    graph["nodes"].insert(1, {
        "target": "torch.ops.aten.fill_.Scalar",
        "inputs": [{"name": "self", "arg": {"as_tensor": {"name": "mapped"}}, "kind": 1},
                   {"name": "value", "arg": {"as_int": 0}, "kind": 1}],
        "outputs": [{"as_tensor": {"name": "filled"}}], "metadata": {}, "name": "filled"})
    meta = dict(next(iter(graph["tensor_values"].values())))
    graph["tensor_values"]["mapped"] = graph["tensor_values"]["filled"] = meta


def _custom_obj_value(p, marker, victim):
    p["graph_module"]["graph"]["custom_obj_values"]["obj"] = {"name": "obj", "class_fqn": "__torch__.torch.classes.x"}


def _custom_obj_argument(p, marker, victim):
    p["graph_module"]["graph"]["nodes"][0]["inputs"][0]["arg"] = {
        "as_custom_obj": {"name": "obj", "class_fqn": "__torch__.torch.classes.x"}}


def _huge_tensor_value(p, marker, victim):
    meta = next(iter(p["graph_module"]["graph"]["tensor_values"].values()))
    meta["sizes"] = [{"as_int": 1 << 20}, {"as_int": 1 << 20}]
    meta["strides"] = [{"as_int": 1 << 20}, {"as_int": 1}]


def _weights(change):
    return lambda data, marker, victim: edit_json(data, "data/weights/model_weights_config.json",
                                                  lambda c: change(next(iter(c["config"].values()))))


def _pickle_payload(marker) -> bytes:
    class Payload:
        def __reduce__(self):
            import os

            return (os.system, (f"touch {marker}",))

    return pickle.dumps(Payload())


def _use_pickle(data, marker, victim):
    root, content = members(data)
    config = json.loads(content["data/weights/model_weights_config.json"])
    entry = next(iter(config["config"].values()))
    entry["use_pickle"] = True
    content[f"data/weights/{entry['path_name']}"] = _pickle_payload(marker)
    content["data/weights/model_weights_config.json"] = json.dumps(config).encode()
    return build(root, content)


def _constant_entry(prefix):
    def make(data, marker, victim):
        root, content = members(data)
        config = {"config": {"evil": {"path_name": f"{prefix}0", "is_param": False, "use_pickle": False,
                                      "tensor_meta": None}}}
        content["data/constants/model_constants_config.json"] = json.dumps(config).encode()
        content[f"data/constants/{prefix}0"] = _pickle_payload(marker)
        return build(root, content)
    return make


def _huge_weight(entry):
    entry["tensor_meta"]["sizes"] = [{"as_int": 1 << 40}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1}]


def _storage_mismatch(entry):
    entry["tensor_meta"]["sizes"] = [{"as_int": 4096}]
    entry["tensor_meta"]["strides"] = [{"as_int": 1}]


def _duplicate_member(data, marker, victim):
    root, content = members(data)
    return build(root, content, extra=[("models/model.json", content["models/model.json"])])


def _nested_zip(data, marker, victim):
    root, content = members(data)
    return build(root, content, extra=[("data/inner.pt2", data)])


def _climbing_member(data, marker, victim):
    root, content = members(data)
    return build(root, content, extra=[("../../escape.txt", b"x")])


def _aoti_member(data, marker, victim):
    root, content = members(data)
    return build(root, content, extra=[("data/aotinductor/model/model.so", b"\x7fELF")])


def _compressed_member(data, marker, victim):
    root, content = members(data)
    return build(root, content, compress={"models/model.json"})


def _duplicate_json_key(data, marker, victim):
    root, content = members(data)
    text = content["data/weights/model_weights_config.json"].decode()
    content["data/weights/model_weights_config.json"] = text.replace('{"config": {', '{"config": {}, "config": {', 1).encode()
    return build(root, content)


def _hop_subgraph(data, marker, victim):
    def change(p, marker, victim):
        node = next(n for n in p["graph_module"]["graph"]["nodes"] if n["target"].endswith("higher_order.cond"))
        sub = next(i["arg"]["as_graph"] for i in node["inputs"] if "as_graph" in i["arg"])
        sub["graph"]["nodes"][0]["target"] = "torch.ops.aten.from_file.default"
    return edit_json(data, "models/model.json", lambda p: change(p, marker, victim))


CRAFTED = {
    "expr_str in a size": program(_expr_in_size),
    "opaque object constant": _constant_entry("opaque_obj_"),
    "from_file then fill_": program(_from_file_then_fill),
    "expr_str in a stride": program(_expr_in_stride),
    "expr_str in sym_int_values": program(_expr_in_sym_int),
    "range constraint name": program(_range_constraint_key),
    "guards_code": program(_guards_code),
    "size guard followed by code": program(_size_guard_with_payload),
    "tree spec enum context": program(_treespec_enum),
    "tree spec container type": program(_treespec_type),
    "unknown namespace": program(_node_target("torch.ops.evil.run.default")),
    "python builtin target": program(_node_target("builtins.eval")),
    "distributed operator": program(_node_target("torch.ops._c10d_functional.all_reduce.default")),
    "seeding operator": program(_node_target("torch.ops.aten.manual_seed.default")),
    "printing operator": program(_node_target("torch.ops.aten._print.default")),
    "custom class value": program(_custom_obj_value),
    "custom class argument": program(_custom_obj_argument),
    "torchbind constant": _constant_entry("custom_obj_"),
    "pickled weight": _use_pickle,
    "2^40-element weight": _weights(_huge_weight),
    "2^40-element graph tensor": program(_huge_tensor_value),
    "storage smaller than declared": _weights(_storage_mismatch),
    "duplicate member": _duplicate_member,
    "zip inside the zip": _nested_zip,
    "member path with ..": _climbing_member,
    "AOTInductor library": _aoti_member,
    "compressed member": _compressed_member,
    "duplicate JSON key": _duplicate_json_key,
}
HOP_CRAFTED = {"higher-order subgraph calling from_file": _hop_subgraph}
EXPECTED = {
    "expr_str in a size": "outside the size grammar",
    "opaque object constant": "opaque object",
    "from_file then fill_": "from_file",
    "expr_str in a stride": "outside the size grammar",
    "expr_str in sym_int_values": "outside the size grammar",
    "range constraint name": "not a symbol name",
    "guards_code": "guards_code",
    "size guard followed by code": "guards_code",
    "tree spec enum context": "tree-spec context",
    "tree spec container type": "container type",
    "unknown namespace": "namespace 'evil'",
    "python builtin target": "builtins.eval",
    "distributed operator": "distributed",
    "seeding operator": "global state",
    "printing operator": "global state",
    "custom class value": "torchbind",
    "custom class argument": "torchbind",
    "torchbind constant": "torchbind",
    "pickled weight": "pickle",
    "2^40-element weight": "1099511627776",
    "2^40-element graph tensor": "memory cap",
    "storage smaller than declared": "stores",
    "duplicate member": "appears twice",
    "zip inside the zip": "data/inner.pt2",
    "member path with ..": "..",
    "AOTInductor library": "AOTInductor",
    "compressed member": "compressed",
    "duplicate JSON key": "duplicate key",
    "higher-order subgraph calling from_file": "subgraph true_graph_0",
}
