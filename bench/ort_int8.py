"""ONNX Runtime's own INT8 quantization of a face model: the peer for MFN's INT8 path.

Two subcommands:

  quantize MODEL.onnx --calib DIR [--images 512] --out OUT.onnx
           [--method minmax|entropy|percentile] [--norm auto|raw|pm1] [--batch 32]
           [--exclude NODE,...] [--json SUMMARY]
      onnxruntime.quantization.shape_inference.quant_pre_process, then
      onnxruntime.quantization.quantize_static: QDQ format, per-channel weights,
      activations QUInt8 (asymmetric), weights QInt8 (symmetric), calibration by
      MinMax unless --method says otherwise. A model below opset 13 is converted to
      opset 13 first (per-channel DequantizeLinear needs it). --exclude keeps the
      named nodes (or the nodes producing the named tensors) in float. Prints the
      operators of the quantized graph and which of them ONNX Runtime's CPU
      execution provider still runs in float.

  lfw MODEL.onnx --images DIR --pairs pairs.txt [--threads 2] [--batch 32] [--json OUT]
           [--norm auto|raw|pm1]
      Embeds every image the LFW pairs use, plain and mirrored, and reports 10-fold
      accuracy (folds of 600 pairs in file order) with and without the flip test under
      both threshold protocols of mfn_eval: insightface's grid (squared distance
      2 - 2cos < t, t = 0.00..3.99 step 0.01, first best) and the exact best threshold
      (cos > t over every midpoint between distinct training scores, smallest best).
      'flip' is normalise(normalise(f(x)) + normalise(f(mirror(x)))), as mfn_eval and
      the golden references compute it; 'flip_rawsum' is insightface's
      normalise(f(x) + f(mirror(x))).

Calibration faces (the rule MFN's INT8 calibration uses as well): every file under
DIR, recursively, whose name ends in .jpg, .jpeg or .png (any case); sorted by the
path relative to DIR with '/' separators, compared as bytes (UTF-8); then, of the
len files, the N at indices floor(i * len / N) for i in 0..N, or all of them when
len <= N. Each is decoded by PIL (libjpeg) to RGB, must be 112x112, and becomes a
float32 NCHW tensor.

Input normalisation follows the model: an input named 'input.1' (insightface's
w600k_mbf) takes (x - 127.5) / 127.5 ('pm1'); an input named 'data' (insightface's
MobileFaceNet y1, whose graph normalises) takes raw 0..255 pixels ('raw'). Any other
input name needs --norm.

Example:
  python bench/ort_int8.py quantize w600k_mbf.onnx --calib lfw/aligned-112x112 \\
      --images 512 --out /tmp/ort-int8/w600k_mbf.int8.onnx
  python bench/ort_int8.py lfw /tmp/ort-int8/w600k_mbf.int8.onnx \\
      --images lfw/aligned-112x112 --pairs lfw/pairs.txt --threads 2 --json out.json

Needs onnxruntime, onnx, sympy (for quant_pre_process), numpy and Pillow.
Exit status 2 when an input is missing, unreadable or malformed.
"""

import argparse
import collections
import hashlib
import json
import os
import sys
import tempfile
import time

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
NORM_BY_INPUT = {"input.1": "pm1", "data": "raw"}
FACE = 112
PER_CHANNEL_OPSET = 13


class InputError(Exception):
    """A missing, unreadable or malformed input; main() exits with status 2."""


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------
# Files


def require_file(path, what):
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if not os.path.isfile(path):
        raise InputError(f"{what} is not a regular file: {path}")
    if not os.access(path, os.R_OK):
        raise InputError(f"{what} is not readable: {path}")


def require_dir(path, what):
    if not os.path.exists(path):
        raise InputError(f"{what} not found: {path}")
    if not os.path.isdir(path):
        raise InputError(f"{what} is not a directory: {path}")


def fsync_dir(path):
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def temp_path_beside(out, suffix):
    """A fresh, empty file in out's directory (so the final rename stays on one file system)."""
    d = os.path.dirname(os.path.abspath(out)) or "."
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix="." + os.path.basename(out) + ".", suffix=suffix, dir=d)
    except OSError as e:
        raise InputError(f"cannot write {out}: {e}") from None
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would outlive the rename
    return tmp


def commit_file(tmp, out):
    """fsync tmp, rename it over out, fsync the directory."""
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, out)
    fsync_dir(os.path.dirname(os.path.abspath(out)))


def write_json_atomic(obj, out):
    tmp = temp_path_beside(out, ".tmp")
    try:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
        commit_file(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def sha256_of(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------
# Images


def list_images(root):
    """Relative paths ('/'-separated) of every .jpg/.jpeg/.png under root, sorted as UTF-8 bytes."""
    found = []

    def walk_error(e):
        raise InputError(f"cannot read directory {e.filename}: {e.strerror}")

    for dirpath, _dirs, files in os.walk(root, onerror=walk_error):
        rel_dir = os.path.relpath(dirpath, root)
        for name in files:
            low = name.lower()
            # A bare '.jpg' has no extension (a hidden file), as for Rust's Path::extension;
            # broken links are skipped; links to folders are not followed.
            if low.endswith(IMAGE_EXTENSIONS) and low not in IMAGE_EXTENSIONS:
                if not os.path.isfile(os.path.join(dirpath, name)):
                    continue
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                found.append(rel.replace(os.sep, "/"))
    found.sort(key=lambda p: p.encode("utf-8", "surrogateescape"))
    return found


def evenly_spaced(items, n):
    """items[floor(i * len / n)] for i in 0..n, or all of items when len <= n."""
    if len(items) <= n:
        return list(items)
    return [items[i * len(items) // n] for i in range(n)]


def load_face(path):
    """PIL decode to RGB, checked to be 112x112: HWC uint8."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert("RGB"))
    except FileNotFoundError:
        raise InputError(f"image not found: {path}") from None
    except OSError as e:
        raise InputError(f"cannot read image {path}: {e}") from None
    if rgb.shape[:2] != (FACE, FACE):
        raise InputError(
            f"image {path} is {rgb.shape[1]}x{rgb.shape[0]}, expected an aligned {FACE}x{FACE} face"
        )
    return rgb


def to_input(faces_hwc, norm):
    """uint8 [N,H,W,3] -> float32 [N,3,H,W], normalised for the model."""
    x = faces_hwc.astype(np.float32).transpose(0, 3, 1, 2)
    if norm == "pm1":
        x = (x - np.float32(127.5)) / np.float32(127.5)
    return np.ascontiguousarray(x)


# ---------------------------------------------------------------------------
# ONNX Runtime


def make_session(model, threads):
    import onnxruntime as ort

    require_file(model, "model")
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    try:
        return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    except Exception as e:  # onnxruntime raises its own exception types
        raise InputError(f"cannot load model {model}: {e}") from None


def resolve_norm(input_name, norm, model):
    if norm != "auto":
        return norm
    if input_name in NORM_BY_INPUT:
        return NORM_BY_INPUT[input_name]
    raise InputError(
        f"model {model}: input '{input_name}' is neither 'input.1' (w600k_mbf) nor 'data' (y1); "
        "pass --norm raw or --norm pm1"
    )


def model_input(model):
    """(input name, model) of an ONNX file, read without running it."""
    import onnx

    require_file(model, "model")
    try:
        m = onnx.load(model)
    except Exception as e:
        raise InputError(f"cannot read ONNX model {model}: {e}") from None
    inits = {t.name for t in m.graph.initializer}
    inputs = [i.name for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise InputError(f"model {model} has {len(inputs)} inputs {inputs}, expected one image input")
    return inputs[0], m


# ---------------------------------------------------------------------------
# quantize


class FaceReader:
    """onnxruntime.quantization.CalibrationDataReader over decoded faces (uint8 NHWC), in batches."""

    def __init__(self, faces, input_name, norm, batch):
        self.faces, self.input_name = faces, input_name
        self.norm, self.batch, self.pos = norm, batch, 0

    def get_next(self):
        if self.pos >= len(self.faces):
            return None
        part = self.faces[self.pos : self.pos + self.batch]
        self.pos += len(part)
        log(f"calibration: {self.pos}/{len(self.faces)} faces")
        return {self.input_name: to_input(part, self.norm)}

    def rewind(self):
        self.pos = 0


def op_summary(model_proto):
    return collections.Counter(
        (n.domain + "." if n.domain not in ("", "ai.onnx") else "") + n.op_type
        for n in model_proto.graph.node
    )


def float_ops(counter):
    """The op types of an ONNX Runtime CPU graph that are not integer kernels or Q/DQ: what runs in
    float between a DequantizeLinear and a QuantizeLinear (or before the first Q, after the last DQ)."""
    int_ops = ("QLinear", "QGemm", "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear",
               "MatMulInteger", "ConvInteger", "QAttention")
    return collections.Counter(
        {k: v for k, v in counter.items() if not k.split(".")[-1].startswith(int_ops)}
    )


def optimized_ops(model_path):
    """Op types of the graph the CPU execution provider runs after its own fusions."""
    import onnx
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as d:
        opt = os.path.join(d, "optimized.onnx")
        so = ort.SessionOptions()
        so.log_severity_level = 3
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.optimized_model_filepath = opt
        ort.InferenceSession(model_path, so, providers=["CPUExecutionProvider"])
        return op_summary(onnx.load(opt))


def fmt_counter(c):
    return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: (-kv[1], kv[0])))


def default_opset(model_proto):
    return max((o.version for o in model_proto.opset_import if o.domain in ("", "ai.onnx")), default=0)


def name_excluded_nodes(path, wanted, model):
    """Node names in the model at path for the node names or output tensor names in wanted.
    Exported graphs often leave nodes unnamed, so unnamed nodes are named after their first
    output (and the model rewritten) to let quantize_static tell them apart."""
    import onnx

    m = onnx.load(path)
    taken = {n.name for n in m.graph.node if n.name}
    for n in m.graph.node:
        if not n.name and n.output and n.output[0] not in taken:
            n.name = n.output[0]
            taken.add(n.name)
    names = []
    for w in (w.strip() for w in wanted):
        hits = [n.name for n in m.graph.node if w == n.name or w in n.output]
        if not hits:
            raise InputError(f"--exclude: no node named {w!r} and no node output {w!r} in {model} "
                             "(after quant_pre_process, which folds BatchNormalization into Conv)")
        names.extend(hits)
    onnx.save(m, path)
    return sorted(set(names))


def cmd_quantize(a):
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    require_dir(a.calib, "calibration directory")
    if a.images < 1:
        raise InputError("--images must be at least 1")
    input_name, _ = model_input(a.model)
    norm = resolve_norm(input_name, a.norm, a.model)
    all_faces = list_images(a.calib)
    if not all_faces:
        raise InputError(f"no .jpg/.jpeg/.png files under calibration directory {a.calib}")
    chosen = evenly_spaced(all_faces, a.images)
    log(
        f"calibration: {len(chosen)} of {len(all_faces)} faces under {a.calib} "
        f"(first {chosen[0]}, last {chosen[-1]}), norm {norm}, method {a.method}"
    )
    # Decode every chosen face before the quantization starts, so a bad file fails early.
    faces = np.stack([load_face(os.path.join(a.calib, r)) for r in chosen])

    method = {
        "minmax": CalibrationMethod.MinMax,
        "entropy": CalibrationMethod.Entropy,
        "percentile": CalibrationMethod.Percentile,
    }[a.method]
    out = a.out
    tmp_out = temp_path_beside(out, ".onnx")
    t0 = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="ort-int8-") as work:
            src = a.model
            opset = default_opset(onnx.load(src))
            if opset < PER_CHANNEL_OPSET:
                # Per-channel DequantizeLinear needs its 'axis' attribute (opset 13), and
                # quantize_static no longer upgrades the model itself: it would write a graph
                # that onnxruntime refuses to load.
                src = os.path.join(work, "opset13.onnx")
                log(f"{a.model}: opset {opset}; converting to opset {PER_CHANNEL_OPSET} first")
                onnx.save(onnx.version_converter.convert_version(onnx.load(a.model), PER_CHANNEL_OPSET), src)
            pre = os.path.join(work, "preprocessed.onnx")
            log(f"quant_pre_process -> {pre}")
            quant_pre_process(src, pre)
            exclude = []
            if a.exclude:
                exclude = name_excluded_nodes(pre, a.exclude.split(","), a.model)
                log(f"kept in float: {', '.join(exclude)}")
            reader = FaceReader(faces, input_name, norm, a.batch)
            log("quantize_static: QDQ, per-channel, activations QUInt8, weights QInt8")
            quantize_static(
                pre,
                tmp_out,
                calibration_data_reader=reader,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=method,
                nodes_to_exclude=exclude or None,
            )
        commit_file(tmp_out, out)
    except BaseException:
        if os.path.exists(tmp_out):
            os.unlink(tmp_out)
        raise
    secs = time.perf_counter() - t0

    q = onnx.load(out)
    ort_ops = optimized_ops(out)
    summary = {
        "model": a.model,
        "model_sha256": sha256_of(a.model),
        "out": out,
        "out_sha256": sha256_of(out),
        "calibration": {
            "dir": a.calib,
            "found": len(all_faces),
            "used": len(chosen),
            "first": chosen[0],
            "last": chosen[-1],
            "norm": norm,
            "method": a.method,
            "faces": chosen,
        },
        "settings": "quant_pre_process defaults; quantize_static QDQ, per_channel=True, "
        "activation QUInt8, weight QInt8, reduce_range=False",
        "nodes_kept_in_float": exclude,
        "seconds": round(secs, 1),
        "qdq_graph_ops": dict(op_summary(q)),
        "ort_cpu_ops": dict(ort_ops),
        "ort_cpu_float_ops": dict(float_ops(ort_ops)),
    }
    log(f"wrote {out} in {secs:.0f} s")
    log(f"QDQ graph: {fmt_counter(op_summary(q))}")
    log(f"ONNX Runtime CPU graph after its fusions: {fmt_counter(ort_ops)}")
    log(f"of which run in float: {fmt_counter(float_ops(ort_ops)) or 'none'}")
    if a.json:
        write_json_atomic(summary, a.json)
        log(f"wrote {a.json}")
    return 0


# ---------------------------------------------------------------------------
# lfw


def read_pairs(path):
    """LFW View-2 pairs.txt: [(rel1, rel2, same)] in file order and the fold count."""
    require_file(path, "pairs file")
    try:
        with open(path) as f:
            lines = [ln.split() for ln in f]
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read pairs file {path}: {e}") from None
    lines = [(i + 1, ln) for i, ln in enumerate(lines) if ln]
    if not lines or len(lines[0][1]) != 2:
        raise InputError(f"pairs file {path}: line 1 should be '<folds> <pairs per class>'")
    try:
        folds, per = int(lines[0][1][0]), int(lines[0][1][1])
    except ValueError:
        raise InputError(f"pairs file {path}: line 1 should be two integers") from None

    def rel(name, n):
        return f"{name}/{name}_{int(n):04d}.jpg"

    pairs = []
    for lineno, t in lines[1:]:
        try:
            if len(t) == 3:
                pairs.append((rel(t[0], t[1]), rel(t[0], t[2]), True))
            elif len(t) == 4:
                pairs.append((rel(t[0], t[1]), rel(t[2], t[3]), False))
            else:
                raise ValueError
        except ValueError:
            raise InputError(f"pairs file {path}: line {lineno} is not a pair: {' '.join(t)}") from None
    if len(pairs) != folds * 2 * per:
        raise InputError(
            f"pairs file {path}: header says {folds} folds of 2x{per} pairs, found {len(pairs)} pairs"
        )
    return pairs, folds


def embed_all(sess, root, rels, norm, batch):
    """Raw outputs (float32) of each image and of its mirror image."""
    inp = sess.get_inputs()[0].name
    plain, mirrored = [], []
    t0 = time.perf_counter()
    for s in range(0, len(rels), batch):
        part = rels[s : s + batch]
        faces = np.stack([load_face(os.path.join(root, r)) for r in part])
        x = to_input(faces, norm)
        xf = np.ascontiguousarray(x[..., ::-1])
        plain.append(sess.run(None, {inp: x})[0])
        mirrored.append(sess.run(None, {inp: xf})[0])
        done = s + len(part)
        if done == len(rels) or (s // batch) % 20 == 0:
            el = time.perf_counter() - t0
            log(f"embedded {done}/{len(rels)} images ({el:.0f} s, {2 * done / el:.0f} inferences/s)")
    return np.concatenate(plain).astype(np.float32), np.concatenate(mirrored).astype(np.float32)


def l2n(x):
    x = x.astype(np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def fit_insightface(scores, labels):
    """First grid distance threshold i*0.01, i in 0..400, with the best training accuracy ('same' if d < t)."""
    d = 2.0 - 2.0 * scores
    pos = np.sort(d[labels])
    neg = np.sort(d[~labels])
    grid = np.arange(400) * 0.01
    correct = np.searchsorted(pos, grid, side="left") + (
        len(neg) - np.searchsorted(neg, grid, side="left")
    )
    i = int(np.argmax(correct))
    return float(grid[i]), int(correct[i])


def between(lo, hi):
    mid = lo / 2.0 + hi / 2.0 if abs(lo) > 1e300 else (lo + hi) / 2.0
    return mid if mid < hi else lo


def fit_exact(scores, labels):
    """Smallest cosine threshold with the best training accuracy ('same' if cos > t), over the
    midpoints between consecutive distinct scores plus the two ends (as mfn_eval's Exact)."""
    order = np.argsort(scores, kind="stable")
    s, lab = scores[order], labels[order]
    uniq, start = np.unique(s, return_index=True)
    grp_pos = np.add.reduceat(lab.astype(np.int64), start)
    grp_cnt = np.diff(np.append(start, len(s)))
    grp_neg = grp_cnt - grp_pos
    positives = int(lab.sum())
    # correct after rejecting groups 0..=g
    after = positives - np.cumsum(grp_pos) + np.cumsum(grp_neg)
    correct = np.concatenate([[positives], after])
    k = int(np.argmax(correct))
    if k == 0:
        thr = float(np.nextafter(uniq[0], -np.inf))
    elif k == len(uniq):
        thr = float(uniq[-1])
    else:
        thr = between(float(uniq[k - 1]), float(uniq[k]))
    return thr, int(correct[k])


def kfold(scores, labels, n_folds, protocol):
    fold_of = np.arange(len(scores)) * n_folds // len(scores)  # contiguous folds in file order
    folds = []
    for k in range(n_folds):
        tr, te = fold_of != k, fold_of == k
        if protocol == "insightface":
            t, _ = fit_insightface(scores[tr], labels[tr])
            pred = (2.0 - 2.0 * scores[te]) < t
        else:
            t, _ = fit_exact(scores[tr], labels[tr])
            pred = scores[te] > t
        folds.append({"accuracy": float(np.mean(pred == labels[te])), "threshold": t})
    acc = np.array([f["accuracy"] for f in folds])
    return {
        "accuracy_mean": float(acc.mean()),
        "accuracy_std": float(acc.std()),
        "fold_accuracy": [f["accuracy"] for f in folds],
        "thresholds": [f["threshold"] for f in folds],
    }


def cmd_lfw(a):
    import onnxruntime as ort

    require_dir(a.images, "image directory")
    pairs, n_folds = read_pairs(a.pairs)
    sess = make_session(a.model, a.threads)
    input_name = sess.get_inputs()[0].name
    norm = resolve_norm(input_name, a.norm, a.model)
    rels = sorted({p[0] for p in pairs} | {p[1] for p in pairs})
    for r in rels:
        path = os.path.join(a.images, r)
        if not os.path.isfile(path):
            raise InputError(f"image named by {a.pairs} not found: {path}")
    log(f"{a.model}: {len(pairs)} pairs, {len(rels)} images, norm {norm}, {a.threads} threads, batch {a.batch}")
    t0 = time.perf_counter()
    raw, raw_m = embed_all(sess, a.images, rels, norm, a.batch)
    secs = time.perf_counter() - t0
    index = {r: i for i, r in enumerate(rels)}
    i1 = np.array([index[p[0]] for p in pairs])
    i2 = np.array([index[p[1]] for p in pairs])
    labels = np.array([p[2] for p in pairs])

    embeddings = {
        "noflip": l2n(raw),
        # mfn_eval / lfw-y1-reference.json: normalise each view, sum, normalise.
        "flip": l2n(l2n(raw) + l2n(raw_m)),
        # insightface verification.py: sum the raw outputs, normalise.
        "flip_rawsum": l2n(raw.astype(np.float64) + raw_m),
    }
    results = {}
    for name, e in embeddings.items():
        scores = np.sum(e[i1] * e[i2], axis=1)
        results[name] = {p: kfold(scores, labels, n_folds, p) for p in ("insightface", "exact")}

    print(f"{a.model}  ({len(pairs)} pairs, {n_folds} folds, PIL/libjpeg decode)")
    print(f"{'embedding':<12} {'insightface grid':>17} {'exact':>8}")
    for name, r in results.items():
        print(
            f"{name:<12} {100 * r['insightface']['accuracy_mean']:>16.3f}% "
            f"{100 * r['exact']['accuracy_mean']:>7.3f}%"
        )
    if a.json:
        write_json_atomic(
            {
                "model": a.model,
                "model_sha256": sha256_of(a.model),
                "runtime": "onnxruntime " + ort.__version__,
                "threads": a.threads,
                "batch": a.batch,
                "images": a.images,
                "pairs_file": a.pairs,
                "pairs": len(pairs),
                "folds": n_folds,
                "decoder": "libjpeg via PIL, RGB",
                "norm": norm,
                "embedding": {
                    "noflip": "L2-normalised output",
                    "flip": "L2-normalise(normalise(f(x)) + normalise(f(hflip(x))))",
                    "flip_rawsum": "L2-normalise(f(x) + f(hflip(x)))",
                },
                "protocols": {
                    "insightface": "squared L2 distance 2-2cos, grid 0.00..3.99 step 0.01, "
                    "'same' if d < t, first best threshold on the 9 training folds",
                    "exact": "cosine, every midpoint between consecutive distinct training "
                    "scores plus both ends, 'same' if cos > t, smallest best threshold",
                },
                "embed_seconds": round(secs, 1),
                "results": results,
            },
            a.json,
        )
        log(f"wrote {a.json}")
    return 0


# ---------------------------------------------------------------------------


def main(argv=None):
    ap = argparse.ArgumentParser(
        description="ONNX Runtime INT8 quantization and LFW accuracy of face models.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="static QDQ INT8 quantization calibrated on faces")
    q.add_argument("model", help="fp32 ONNX model")
    q.add_argument("--calib", required=True, help="directory of calibration faces (112x112)")
    q.add_argument("--images", type=int, default=512, help="calibration faces, evenly spaced (default 512)")
    q.add_argument("--out", required=True, help="quantized ONNX model to write")
    q.add_argument("--method", choices=("minmax", "entropy", "percentile"), default="minmax",
                   help="calibration method (default minmax; entropy and percentile keep every "
                   "activation of every calibration face in memory)")
    q.add_argument("--norm", choices=("auto", "raw", "pm1"), default="auto",
                   help="input normalisation: raw 0..255 or (x-127.5)/127.5 (default: by input name)")
    q.add_argument("--batch", type=int, default=32, help="calibration batch size (default 32)")
    q.add_argument("--exclude", help="comma-separated node names or node output tensor names to keep "
                   "in float (nodes_to_exclude), e.g. a model's global depthwise conv")
    q.add_argument("--json", help="write a summary (settings, op counts) here")
    q.set_defaults(func=cmd_quantize)

    l = sub.add_parser("lfw", help="LFW 10-fold accuracy, flip and no flip, both protocols")
    l.add_argument("model", help="ONNX model (fp32 or quantized)")
    l.add_argument("--images", required=True, help="lfw/aligned-112x112")
    l.add_argument("--pairs", required=True, help="lfw/pairs.txt")
    l.add_argument("--threads", type=int, default=2, help="intra_op_num_threads (default 2)")
    l.add_argument("--batch", type=int, default=32, help="images per inference batch (default 32)")
    l.add_argument("--norm", choices=("auto", "raw", "pm1"), default="auto")
    l.add_argument("--json", help="write per-fold results here")
    l.set_defaults(func=cmd_lfw)

    a = ap.parse_args(argv)
    if a.batch < 1:
        ap.error("--batch must be at least 1")
    if getattr(a, "threads", 1) < 1:
        ap.error("--threads must be at least 1")
    try:
        return a.func(a)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
