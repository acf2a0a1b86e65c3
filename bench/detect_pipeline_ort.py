#!/usr/bin/env python3
"""Peer benchmark: ONNX Runtime (CPU) running insightface's photo -> embedding pipeline.

Times the full per-photo pipeline -- decode (cv2.imread, BGR), SCRFD detection,
5-point alignment, ArcFace embedding -- with insightface's own pre- and
post-processing reproduced line for line, so MFN's detect+embed pipeline can be
compared against the reference Python stack on the same photos and models.

Sources followed (github.com/deepinsight/insightface):
  * python-package/insightface/model_zoo/scrfd.py        -- SCRFD.detect / forward / nms,
                                                            distance2bbox, distance2kps
  * python-package/insightface/utils/face_align.py       -- arcface_dst, estimate_norm, norm_crop
  * python-package/insightface/model_zoo/arcface_onnx.py -- ArcFaceONNX.get / get_feat
  * python-package/insightface/app/face_analysis.py      -- FaceAnalysis.get (det_size (640, 640),
                                                            max_num, metric='default')

Dependencies (numpy, onnxruntime, opencv-python-headless, scikit-image), e.g. in a venv:

    python3 -m venv .venv
    .venv/bin/pip install onnxruntime numpy opencv-python-headless scikit-image

Usage:

    .venv/bin/python bench/detect_pipeline_ort.py \\
        --det scrfd_500m_bnkps.onnx --rec w600k_mbf.onnx \\
        --photos PHOTO_DIR_OR_LIST [--threads 1,2] [--rounds 3] \\
        [--json OUT.json] [--dump-faces FACES.json] [--alternate-cmd "SHELL COMMAND"]

--photos is a folder (all .jpg/.jpeg/.png below it, recursively, sorted) or a
text file with one path per line (relative paths are taken relative to the
current directory, else to the list file's folder; blank lines and lines
starting with '#' are skipped).

For each thread count, fresh sessions are built (intra_op_num_threads=threads,
inter_op_num_threads=1, CPUExecutionProvider), warmed up on a few photos, then
every photo's full pipeline is timed with time.perf_counter, over --rounds
passes. One line per thread count reports median/mean ms per photo and
photos/s; --json writes rows
{engine, threads, photos, median_ms, mean_ms, photos_per_s, intra_op_spinning}.

The detector and the recogniser each own an ORT session with its own intra-op
thread pool, and by default ORT's pool threads spin-wait after each run. With
threads >= 2 on a machine with few (or busy) cores, the idle session's spinning
threads compete with the running one and can make the pipeline up to ~3x
slower than at 1 thread; --no-spin sets session.intra_op.allow_spinning=0 to
measure ORT without that effect. Report which setting was used.

--dump-faces writes, per photo, the chosen face (max_num=1, metric 'default':
box, score, 5 landmarks in original-image pixels) and the L2-normalised
embedding, for comparison with another implementation.

--alternate-cmd runs, per round, this script's pass and then the given shell
command (the other engine's pass), alternating, and records the wall time of
each; it prints the ratio other/ours per round and the median ratio. The
substring {threads} in the command is replaced by the current thread count (the
value is also exported as MFN_BENCH_THREADS). Interleaving the two engines
this way keeps a noisy shared machine from favouring either one.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import warnings

import cv2
import numpy as np
import onnxruntime
from skimage import transform as trans

ENGINE = "onnxruntime-insightface"

# scikit-image >= 0.26 deprecates SimilarityTransform.estimate in favour of
# from_estimate; insightface calls estimate(), so keep that and silence the notice.
warnings.filterwarnings("ignore", message=r".*`estimate` is deprecated.*", category=FutureWarning)


# --------------------------------------------------------------------------
# insightface/model_zoo/scrfd.py
# --------------------------------------------------------------------------

def distance2bbox(points, distance, max_shape=None):
    x1 = points[:, 0] - distance[:, 0]
    y1 = points[:, 1] - distance[:, 1]
    x2 = points[:, 0] + distance[:, 2]
    y2 = points[:, 1] + distance[:, 3]
    return np.stack([x1, y1, x2, y2], axis=-1)


def distance2kps(points, distance, max_shape=None):
    preds = []
    for i in range(0, distance.shape[1], 2):
        px = points[:, i % 2] + distance[:, i]
        py = points[:, i % 2 + 1] + distance[:, i + 1]
        preds.append(px)
        preds.append(py)
    return np.stack(preds, axis=-1)


class SCRFD:
    def __init__(self, session, det_size=(640, 640)):
        self.session = session
        self.batched = False
        self.center_cache = {}
        self.nms_thresh = 0.4
        self.det_thresh = 0.5
        self._init_vars()
        # FaceAnalysis.prepare(det_size=(640, 640)) -> SCRFD.prepare(input_size=...):
        # a model with a fixed input size keeps its own.
        if self.input_size is None:
            self.input_size = tuple(det_size)

    def _init_vars(self):
        input_cfg = self.session.get_inputs()[0]
        input_shape = input_cfg.shape
        if isinstance(input_shape[2], str) or input_shape[2] is None:
            self.input_size = None
        else:
            self.input_size = tuple(input_shape[2:4][::-1])
        self.input_name = input_cfg.name
        outputs = self.session.get_outputs()
        if len(outputs[0].shape) == 3:
            self.batched = True
        self.output_names = [o.name for o in outputs]
        self.input_mean = 127.5
        self.input_std = 128.0
        self.use_kps = False
        self._anchor_ratio = 1.0
        self._num_anchors = 1
        if len(outputs) == 6:
            self.fmc = 3
            self._feat_stride_fpn = [8, 16, 32]
            self._num_anchors = 2
        elif len(outputs) == 9:
            self.fmc = 3
            self._feat_stride_fpn = [8, 16, 32]
            self._num_anchors = 2
            self.use_kps = True
        elif len(outputs) == 10:
            self.fmc = 5
            self._feat_stride_fpn = [8, 16, 32, 64, 128]
            self._num_anchors = 1
        elif len(outputs) == 15:
            self.fmc = 5
            self._feat_stride_fpn = [8, 16, 32, 64, 128]
            self._num_anchors = 1
            self.use_kps = True
        else:
            raise ValueError("unexpected SCRFD output count %d" % len(outputs))
        if not self.use_kps:
            raise ValueError("the detector has no landmark outputs; alignment needs them")

    def forward(self, img, threshold):
        scores_list = []
        bboxes_list = []
        kpss_list = []
        input_size = tuple(img.shape[0:2][::-1])
        blob = cv2.dnn.blobFromImage(img, 1.0 / self.input_std, input_size,
                                     (self.input_mean, self.input_mean, self.input_mean), swapRB=True)
        net_outs = self.session.run(self.output_names, {self.input_name: blob})

        input_height = blob.shape[2]
        input_width = blob.shape[3]
        fmc = self.fmc
        for idx, stride in enumerate(self._feat_stride_fpn):
            if self.batched:
                scores = net_outs[idx][0]
                bbox_preds = net_outs[idx + fmc][0]
                bbox_preds = bbox_preds * stride
                if self.use_kps:
                    kps_preds = net_outs[idx + fmc * 2][0] * stride
            else:
                scores = net_outs[idx]
                bbox_preds = net_outs[idx + fmc]
                bbox_preds = bbox_preds * stride
                if self.use_kps:
                    kps_preds = net_outs[idx + fmc * 2] * stride

            height = input_height // stride
            width = input_width // stride
            key = (height, width, stride)
            if key in self.center_cache:
                anchor_centers = self.center_cache[key]
            else:
                anchor_centers = np.stack(np.mgrid[:height, :width][::-1], axis=-1).astype(np.float32)
                anchor_centers = (anchor_centers * stride).reshape((-1, 2))
                if self._num_anchors > 1:
                    anchor_centers = np.stack([anchor_centers] * self._num_anchors, axis=1).reshape((-1, 2))
                if len(self.center_cache) < 100:
                    self.center_cache[key] = anchor_centers

            pos_inds = np.where(scores >= threshold)[0]
            bboxes = distance2bbox(anchor_centers, bbox_preds)
            pos_scores = scores[pos_inds]
            pos_bboxes = bboxes[pos_inds]
            scores_list.append(pos_scores)
            bboxes_list.append(pos_bboxes)
            if self.use_kps:
                kpss = distance2kps(anchor_centers, kps_preds)
                kpss = kpss.reshape((kpss.shape[0], -1, 2))
                pos_kpss = kpss[pos_inds]
                kpss_list.append(pos_kpss)
        return scores_list, bboxes_list, kpss_list

    def detect(self, img, input_size=None, max_num=0, metric='default'):
        input_size = self.input_size if input_size is None else input_size

        im_ratio = float(img.shape[0]) / img.shape[1]
        model_ratio = float(input_size[1]) / input_size[0]
        if im_ratio > model_ratio:
            new_height = input_size[1]
            new_width = int(new_height / im_ratio)
        else:
            new_width = input_size[0]
            new_height = int(new_width * im_ratio)
        det_scale = float(new_height) / img.shape[0]
        resized_img = cv2.resize(img, (new_width, new_height))
        det_img = np.zeros((input_size[1], input_size[0], 3), dtype=np.uint8)
        det_img[:new_height, :new_width, :] = resized_img

        scores_list, bboxes_list, kpss_list = self.forward(det_img, self.det_thresh)

        scores = np.vstack(scores_list)
        scores_ravel = scores.ravel()
        order = scores_ravel.argsort()[::-1]
        bboxes = np.vstack(bboxes_list) / det_scale
        if self.use_kps:
            kpss = np.vstack(kpss_list) / det_scale
        pre_det = np.hstack((bboxes, scores)).astype(np.float32, copy=False)
        pre_det = pre_det[order, :]
        keep = self.nms(pre_det)
        det = pre_det[keep, :]
        if self.use_kps:
            kpss = kpss[order, :, :]
            kpss = kpss[keep, :, :]
        else:
            kpss = None
        if max_num > 0 and det.shape[0] > max_num:
            area = (det[:, 2] - det[:, 0]) * (det[:, 3] - det[:, 1])
            img_center = img.shape[0] // 2, img.shape[1] // 2
            offsets = np.vstack([
                (det[:, 0] + det[:, 2]) / 2 - img_center[1],
                (det[:, 1] + det[:, 3]) / 2 - img_center[0]
            ])
            offset_dist_squared = np.sum(np.power(offsets, 2.0), 0)
            if metric == 'max':
                values = area
            else:
                values = area - offset_dist_squared * 2.0  # some extra weight on the centering
            bindex = np.argsort(values)[::-1]
            bindex = bindex[0:max_num]
            det = det[bindex, :]
            if kpss is not None:
                kpss = kpss[bindex, :]
        return det, kpss

    def nms(self, dets):
        thresh = self.nms_thresh
        x1 = dets[:, 0]
        y1 = dets[:, 1]
        x2 = dets[:, 2]
        y2 = dets[:, 3]
        scores = dets[:, 4]

        areas = (x2 - x1 + 1) * (y2 - y1 + 1)
        order = scores.argsort()[::-1]

        keep = []
        while order.size > 0:
            i = order[0]
            keep.append(i)
            xx1 = np.maximum(x1[i], x1[order[1:]])
            yy1 = np.maximum(y1[i], y1[order[1:]])
            xx2 = np.minimum(x2[i], x2[order[1:]])
            yy2 = np.minimum(y2[i], y2[order[1:]])

            w = np.maximum(0.0, xx2 - xx1 + 1)
            h = np.maximum(0.0, yy2 - yy1 + 1)
            inter = w * h
            ovr = inter / (areas[i] + areas[order[1:]] - inter)

            inds = np.where(ovr <= thresh)[0]
            order = order[inds + 1]

        return keep


# --------------------------------------------------------------------------
# insightface/utils/face_align.py
# --------------------------------------------------------------------------

arcface_dst = np.array(
    [[38.2946, 51.6963], [73.5318, 51.5014], [56.0252, 71.7366],
     [41.5493, 92.3655], [70.7299, 92.2041]],
    dtype=np.float32)


def estimate_norm(lmk, image_size=112, mode='arcface'):
    assert lmk.shape == (5, 2)
    assert image_size % 112 == 0 or image_size % 128 == 0
    if image_size % 112 == 0:
        ratio = float(image_size) / 112.0
        diff_x = 0
    else:
        ratio = float(image_size) / 128.0
        diff_x = 8.0 * ratio
    dst = arcface_dst * ratio
    dst[:, 0] += diff_x
    tform = trans.SimilarityTransform()
    tform.estimate(lmk, dst)
    M = tform.params[0:2, :]
    return M


def norm_crop(img, landmark, image_size=112, mode='arcface'):
    M = estimate_norm(landmark, image_size, mode)
    warped = cv2.warpAffine(img, M, (image_size, image_size), borderValue=0.0)
    return warped


# --------------------------------------------------------------------------
# insightface/model_zoo/arcface_onnx.py
# --------------------------------------------------------------------------

class ArcFaceONNX:
    def __init__(self, session):
        self.session = session
        # ArcFaceONNX picks (0, 1) only for mxnet-converted graphs that start with
        # Sub/Mul nodes; the w600k_* models use 127.5 / 127.5.
        self.input_mean = 127.5
        self.input_std = 127.5
        input_cfg = self.session.get_inputs()[0]
        input_shape = input_cfg.shape
        if isinstance(input_shape[2], str) or input_shape[2] is None:
            self.input_size = (112, 112)
        else:
            self.input_size = tuple(input_shape[2:4][::-1])
        self.input_name = input_cfg.name
        self.output_names = [o.name for o in self.session.get_outputs()]

    def get(self, img, kps):
        aimg = norm_crop(img, landmark=kps, image_size=self.input_size[0])
        return self.get_feat(aimg).flatten()

    def get_feat(self, imgs):
        if not isinstance(imgs, list):
            imgs = [imgs]
        blob = cv2.dnn.blobFromImages(imgs, 1.0 / self.input_std, self.input_size,
                                      (self.input_mean, self.input_mean, self.input_mean), swapRB=True)
        net_out = self.session.run(self.output_names, {self.input_name: blob})[0]
        return net_out


# --------------------------------------------------------------------------
# pipeline + benchmark
# --------------------------------------------------------------------------

def make_session(path, threads, spin=True):
    so = onnxruntime.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    if not spin:
        so.add_session_config_entry('session.intra_op.allow_spinning', '0')
    return onnxruntime.InferenceSession(path, sess_options=so, providers=['CPUExecutionProvider'])


class Pipeline:
    def __init__(self, det_path, rec_path, threads, spin=True, det_size=(640, 640)):
        self.det = SCRFD(make_session(det_path, threads, spin), det_size)
        self.rec = ArcFaceONNX(make_session(rec_path, threads, spin))

    def run(self, path):
        """decode + detect (max_num=1) + align + embed; None when no face is found."""
        img = cv2.imread(path)
        if img is None:
            raise RuntimeError("cannot decode %s" % path)
        bboxes, kpss = self.det.detect(img, max_num=1, metric='default')
        if bboxes.shape[0] == 0:
            return None
        emb = self.rec.get(img, kpss[0])
        normed = emb / np.linalg.norm(emb)
        return bboxes[0], kpss[0], normed


def list_photos(spec):
    exts = ('.jpg', '.jpeg', '.png')
    if os.path.isdir(spec):
        found = []
        for root, _dirs, files in os.walk(spec):
            for f in files:
                if f.lower().endswith(exts):
                    found.append(os.path.join(root, f))
        return sorted(found)
    base = os.path.dirname(os.path.abspath(spec))
    out = []
    with open(spec) as fh:
        for line in fh:
            p = line.strip()
            if not p or p.startswith('#'):
                continue
            if not os.path.isabs(p) and not os.path.exists(p):
                p = os.path.join(base, p)
            out.append(p)
    return out


def timed_pass(pipe, photos, sink):
    t_pass = time.perf_counter()
    for p in photos:
        t0 = time.perf_counter()
        pipe.run(p)
        sink.append(time.perf_counter() - t0)
    return time.perf_counter() - t_pass


def dump_faces(pipe, photos, out_path, det_path, rec_path):
    rows = []
    for p in photos:
        r = pipe.run(p)
        if r is None:
            rows.append({"path": p, "face": None, "embedding": None})
            continue
        det, kps, emb = r
        rows.append({
            "path": p,
            "face": {
                "box": [float(v) for v in det[:4]],
                "score": float(det[4]),
                "landmarks": [float(v) for v in kps.reshape(-1)],
            },
            "embedding": [float(v) for v in emb],
        })
    doc = {
        "engine": ENGINE,
        "runtime": "onnxruntime %s, opencv %s" % (onnxruntime.__version__, cv2.__version__),
        "det": det_path,
        "rec": rec_path,
        "det_size": list(pipe.det.input_size),
        "selection": "insightface SCRFD.detect max_num=1 metric='default'",
        "embedding": "L2-normalised",
        "photos": rows,
    }
    with open(out_path, 'w') as fh:
        json.dump(doc, fh, indent=1)
    found = sum(1 for r in rows if r["face"] is not None)
    print("wrote %s (%d photos, %d with a face)" % (out_path, len(rows), found))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n', 1)[0])
    ap.add_argument('--det', required=True, help='SCRFD ONNX model (e.g. scrfd_500m_bnkps.onnx)')
    ap.add_argument('--rec', required=True, help='ArcFace ONNX model (e.g. w600k_mbf.onnx)')
    ap.add_argument('--photos', required=True, help='folder (recursive .jpg/.png) or text file of paths')
    ap.add_argument('--threads', default='1', help='comma-separated intra-op thread counts (default 1)')
    ap.add_argument('--rounds', type=int, default=3, help='full passes over the photos (default 3)')
    ap.add_argument('--warmup', type=int, default=5, help='photos run untimed before timing (default 5)')
    ap.add_argument('--no-spin', action='store_true',
                    help="set session.intra_op.allow_spinning=0 (ORT's default is to spin)")
    ap.add_argument('--json', help='write result rows here')
    ap.add_argument('--dump-faces', help='write chosen face + L2-normalised embedding per photo here')
    ap.add_argument('--alternate-cmd',
                    help='shell command (other engine pass) run after each of our rounds; '
                         '{threads} is replaced by the thread count')
    args = ap.parse_args()

    photos = list_photos(args.photos)
    if not photos:
        sys.exit("no photos found in %s" % args.photos)
    threads_list = [int(t) for t in args.threads.split(',') if t.strip()]
    if args.rounds < 1:
        sys.exit("--rounds must be >= 1")

    print("%s: onnxruntime %s, opencv %s, %d photos, %d rounds, intra-op spinning %s"
          % (ENGINE, onnxruntime.__version__, cv2.__version__, len(photos), args.rounds,
             "off" if args.no_spin else "on (default)"))

    rows = []
    for ti, threads in enumerate(threads_list):
        pipe = Pipeline(args.det, args.rec, threads, spin=not args.no_spin)
        if ti == 0 and args.dump_faces:
            dump_faces(pipe, photos, args.dump_faces, args.det, args.rec)
        for p in photos[:max(0, args.warmup)]:
            pipe.run(p)

        times = []
        ratios = []
        ours_walls = []
        other_walls = []
        for rnd in range(args.rounds):
            wall = timed_pass(pipe, photos, times)
            ours_walls.append(wall)
            if args.alternate_cmd:
                cmd = args.alternate_cmd.replace('{threads}', str(threads))
                env = dict(os.environ, MFN_BENCH_THREADS=str(threads))
                sys.stdout.flush()
                t0 = time.perf_counter()
                res = subprocess.run(cmd, shell=True, env=env)
                other = time.perf_counter() - t0
                if res.returncode != 0:
                    sys.exit("alternate command failed (exit %d): %s" % (res.returncode, cmd))
                other_walls.append(other)
                ratios.append(other / wall)
                print("  threads=%d round %d: ours %.3f s, other %.3f s, other/ours %.3f"
                      % (threads, rnd + 1, wall, other, other / wall))

        ms = [t * 1e3 for t in times]
        median_ms = statistics.median(ms)
        mean_ms = statistics.fmean(ms)
        row = {
            "engine": ENGINE,
            "threads": threads,
            "photos": len(photos),
            "median_ms": round(median_ms, 4),
            "mean_ms": round(mean_ms, 4),
            "photos_per_s": round(1e3 / mean_ms, 3),
            "intra_op_spinning": not args.no_spin,
        }
        line = ("%s threads=%d photos=%d rounds=%d: median %.2f ms, mean %.2f ms, %.1f photos/s"
                % (ENGINE, threads, len(photos), args.rounds, median_ms, mean_ms, row["photos_per_s"]))
        if ratios:
            med_ratio = statistics.median(ratios)
            row["alternate"] = {
                "command": args.alternate_cmd,
                "ours_wall_s": [round(w, 4) for w in ours_walls],
                "other_wall_s": [round(w, 4) for w in other_walls],
                "ratio_other_over_ours": [round(r, 4) for r in ratios],
                "median_ratio": round(med_ratio, 4),
            }
            line += ", median other/ours %.3f" % med_ratio
        print(line)
        rows.append(row)

    if args.json:
        with open(args.json, 'w') as fh:
            json.dump(rows, fh, indent=1)
            fh.write('\n')
        print("wrote %s" % args.json)


if __name__ == '__main__':
    main()
