"""A minimal stand-in for TensorFlow Serving's REST API: one SavedModel, TensorFlow only.

It imports only the standard library, NumPy and TensorFlow (never Keras or
`keras_resmem`), as a model server has them, so run it by its path:

    python keras_resmem/sharded/tf_server.py --model_dir shard_0/1 --model_name shard_0 \\
        --port 8501

(`python -m keras_resmem.sharded.tf_server` would import the package first.)

It loads one SavedModel with `tf.saved_model.load` and answers, for any of
its signatures, the requests TensorFlow Serving's REST API answers:

- `POST /v1/models/<name>[/versions/<v>]:predict` with
  `{"signature_name": ..., "inputs": {...}}` (columnar; answers
  `{"outputs": {...}}`, or the one output unnamed) or `{"instances": [...]}`
  (rows; answers `{"predictions": [...]}`);
- `GET /v1/models/<name>` (its status) and `GET /v1/models/<name>/metadata`
  (its signatures, as TensorFlow Serving lists them).

String tensors follow TensorFlow Serving's JSON mapping
(tensorflow_serving/g3doc/api_rest.md, "Encoding binary values" and
"Output of binary values"; tensorflow_serving/util/json_tensor.cc): a
string input may be given as `{"b64": "<base64>"}` (its bytes), and a string
output whose name ends in `_bytes` is written as `{"b64": ...}`; other string
outputs as JSON strings (UTF-8).

Errors answer `{"error": "..."}` with status 400 (a bad request) or 404 (an
unknown model or path). HTTP/1.1 with keep-alive, a thread per connection.
`--model_dir` is a SavedModel, or a directory of numbered versions (the
highest is served, as TensorFlow Serving's `--model_base_path`).

Once it listens, it prints one line, `READY <model URL>`, and flushes it
(`--port 0` picks a free port, which the line names). float32 outputs are
written with 9 significant digits (`json_text`): exact, and shorter and
faster than float64's 17. It listens on 127.0.0.1 unless `--host` says
otherwise, with no authentication: a stand-in for tests and benchmarks.
"""

if __name__ == "__main__":
    import os
    import sys

    # The script's own directory is first on sys.path: never import a
    # sibling module (or a package file) in place of a library's.
    _here = os.path.dirname(os.path.abspath(__file__))
    if sys.path and os.path.abspath(sys.path[0] or os.curdir) == _here:
        del sys.path[0]
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import argparse  # noqa: E402
import base64  # noqa: E402
import binascii  # noqa: E402
import functools  # noqa: E402
import http.server  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import socketserver  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

_PREDICT = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?:(\w+)$")
_MODEL = re.compile(r"^/v1/models/([^/:]+)(?:/versions/(\d+))?(/metadata)?/?$")
_MAX_BODY = 1 << 30


class RequestError(Exception):
    """A request the server answers with an error status and message."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def _version_dir(model_dir):
    """`(path, version)`: a SavedModel directory, or the highest numbered version under it."""
    model_dir = os.path.abspath(model_dir)
    if os.path.isfile(os.path.join(model_dir, "saved_model.pb")):
        name = os.path.basename(model_dir)
        return model_dir, int(name) if name.isdigit() else 1
    versions = [
        int(name)
        for name in os.listdir(model_dir)
        if name.isdigit() and os.path.isfile(os.path.join(model_dir, name, "saved_model.pb"))
    ]
    if not versions:
        raise SystemExit(
            f"--model_dir must be a SavedModel directory or hold numbered versions of one. "
            f"Received: {model_dir}"
        )
    return os.path.join(model_dir, str(max(versions))), max(versions)


def _tensor_info(info):
    """A `TensorInfo` proto as TensorFlow Serving's metadata writes it in JSON."""
    from tensorflow.core.framework import types_pb2

    out = {"dtype": types_pb2.DataType.Name(info.dtype), "name": info.name}
    if info.tensor_shape.unknown_rank:
        out["tensor_shape"] = {"unknown_rank": True}
    else:
        out["tensor_shape"] = {"dim": [{"size": str(d.size)} for d in info.tensor_shape.dim]}
    return out


def _signature_metadata(path):
    """The SavedModel's signatures as TensorFlow Serving's metadata lists them."""
    from tensorflow.core.protobuf import saved_model_pb2

    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    return {
        name: {
            "inputs": {key: _tensor_info(info) for key, info in signature.inputs.items()},
            "outputs": {key: _tensor_info(info) for key, info in signature.outputs.items()},
            "method_name": signature.method_name,
        }
        for name, signature in proto.meta_graphs[0].signature_def.items()
        if not name.startswith("__")
    }


def _as_numpy(value):
    array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
    if array.dtype.kind in "SO":  # strings, decoded (base64 is not needed here)
        decode = np.vectorize(lambda b: b.decode("utf-8", "replace"), otypes=[object])
        array = decode(array) if array.size else array.astype(object)
    return array


# TensorFlow Serving's JSON for bytes (json_tensor.cc: `kBase64Key`,
# `kBytesTensorNameSuffix`, `IsValBase64Object`, `IsNamedTensorBytes`).
_BASE64_KEY = "b64"
_BYTES_SUFFIX = "_bytes"


def _is_b64(value):
    """Whether `value` is `{"b64": "<a string>"}` (that key alone), as TensorFlow Serving tells."""
    return isinstance(value, dict) and len(value) == 1 and isinstance(value.get(_BASE64_KEY), str)


def _b64decode(text):
    """Standard base64 (padding optional, as absl::Base64Unescape reads it); strict."""
    text = text + "=" * (-len(text) % 4)
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # Python 3.11+: fast, strict
    except TypeError:
        return base64.b64decode(text, validate=True)


def _string_input(value, top=True):
    """A string input's JSON value with each `{"b64": ...}` as its bytes; lists as object arrays."""
    if isinstance(value, list):
        items = [_string_input(v, top=False) for v in value]
        # An object array: `tf.constant` reads it faster than a list, and keeps
        # trailing NUL bytes (NumPy's `S` dtype would drop them).
        return np.array(items, object) if top else items
    if isinstance(value, dict):
        if not _is_b64(value):
            raise RequestError(
                f"JSON Value: {json.dumps(value)[:200]} not formatted correctly for base64 data"
            )
        try:
            return _b64decode(value[_BASE64_KEY])
        except (binascii.Error, ValueError) as error:
            raise RequestError(f"Unable to base64 decode: {error}") from error
    if isinstance(value, str):
        return value.encode("utf-8")
    return value


def _bytes_text(value):
    """A string output named `*_bytes` as JSON: each element `{"b64": "<base64>"}`.

    `value` is what `Tensor.numpy()` gives: `bytes` for a scalar, else an
    object array of `bytes` (never NumPy's `S` dtype, which drops trailing
    NUL bytes).
    """
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, list):
        return "[" + ",".join(_bytes_text(v) for v in value) + "]"
    return '{"b64":"' + base64.b64encode(value).decode("ascii") + '"}'


def _is_bytes_output(name, value):
    return name.endswith(_BYTES_SUFFIX) and value.dtype == tf.string


@functools.lru_cache(maxsize=64)
def _row_template(shape):
    """A `%`-format of nested JSON lists of `shape`, one `%#.9g` per value."""
    if not shape:
        return "%#.9g"
    inner = _row_template(shape[1:])
    return "[" + ",".join([inner] * shape[0]) + "]"


def json_text(array):
    """An array as JSON text (nested lists): fast, and exact for float32.

    float32 (and float16) values are written with 9 significant digits
    (`%#.9g`, all of an array in one `%` operation), which give back the
    same float32 through any correctly rounding JSON parser, also one that
    parses to float64 first (9 digits keep the decimal at least 2.5e-8
    relative from a float32 rounding boundary, far beyond float64's
    rounding): about 40% less text than float64's 17 digits, and 2-3 times
    faster than `json.dumps`. Floats keep a point (they read back as
    floats, -0.0 included); NaN and infinities are written `NaN`,
    `Infinity` and `-Infinity`, as TensorFlow Serving reads and writes them.
    Other dtypes go through `json.dumps`.
    """
    array = np.asarray(array)
    if array.size == 0 or array.dtype.kind != "f" or array.dtype.itemsize > 4:
        return json.dumps(array.tolist(), separators=(",", ":"))
    if array.ndim == 0:
        template = "%#.9g"
    else:
        template = "[" + ",".join([_row_template(array.shape[1:])] * len(array)) + "]"
    text = template % tuple(array.ravel().tolist())
    # `%#.9g` of a 9-digit integer ends in a bare point ("123456792."): not JSON.
    text = text.replace(".,", ".0,").replace(".]", ".0]")
    if text.endswith("."):
        text += "0"
    if not np.isfinite(array).all():
        text = text.replace("nan", "NaN").replace("inf", "Infinity")
    return text


class Model:
    """A loaded SavedModel and its signatures' input specs."""

    def __init__(self, path, name, version):
        self.path, self.name, self.version = path, name, version
        self.loaded = tf.saved_model.load(path)
        self.signatures = {
            key: fn for key, fn in self.loaded.signatures.items() if not key.startswith("__")
        }
        self.specs = {key: fn.structured_input_signature[1] for key, fn in self.signatures.items()}
        self.metadata = _signature_metadata(path)

    def _tensors(self, signature, inputs):
        specs = self.specs[signature]
        unknown = sorted(set(inputs) - set(specs))
        missing = sorted(set(specs) - set(inputs))
        if unknown or missing:
            raise RequestError(
                f"Signature {signature!r} takes inputs {sorted(specs)}; the request has "
                f"{sorted(inputs)} (missing {missing}, unknown {unknown})."
            )
        tensors = {}
        for name, spec in specs.items():
            try:
                if spec.dtype == tf.string:
                    tensor = tf.constant(_string_input(inputs[name]), tf.string)
                else:
                    tensor = tf.constant(np.asarray(inputs[name], spec.dtype.as_numpy_dtype))
            except (ValueError, TypeError, OverflowError) as error:
                raise RequestError(
                    f"Input {name!r} must be {spec.dtype.name} of shape {spec.shape}: {error}"
                ) from error
            if not spec.shape.is_compatible_with(tensor.shape):
                raise RequestError(
                    f"Input {name!r} must have shape {spec.shape}. Received: shape {tensor.shape}"
                )
            tensors[name] = tensor
        return tensors

    def predict(self, request):
        """The answer to a `:predict` request (a parsed JSON object): JSON text, or an object."""
        if not isinstance(request, dict):
            raise RequestError("The request must be a JSON object.")
        signature = request.get("signature_name") or "serving_default"
        if signature not in self.signatures:
            raise RequestError(
                f"Serving signature name: {signature!r} not found in signature def. "
                f"Signatures: {sorted(self.signatures)}"
            )
        columnar = "inputs" in request
        if columnar == ("instances" in request):
            raise RequestError("The request must have exactly one of 'inputs' and 'instances'.")
        names = list(self.specs[signature])
        if columnar:
            inputs = request["inputs"]
            if not isinstance(inputs, dict) or _is_b64(inputs):
                if len(names) != 1:
                    raise RequestError(f"'inputs' must name the inputs {names}.")
                inputs = {names[0]: inputs}
        else:
            instances = request["instances"]
            if not isinstance(instances, list):
                raise RequestError("'instances' must be a list.")
            if instances and all(isinstance(r, dict) and not _is_b64(r) for r in instances):
                inputs = {name: [row.get(name) for row in instances] for name in names}
            elif len(names) == 1:
                inputs = {names[0]: instances}
            else:
                raise RequestError(f"Each instance must be an object naming the inputs {names}.")
        try:
            outputs = self.signatures[signature](**self._tensors(signature, inputs))
        except tf.errors.OpError as error:
            raise RequestError(error.message) from error
        raw = {n: v.numpy() for n, v in outputs.items() if _is_bytes_output(n, v)}
        arrays = {
            name: np.asarray(raw[name], object) if name in raw else _as_numpy(value)
            for name, value in outputs.items()
        }
        if columnar:
            texts = {
                name: _bytes_text(raw[name]) if name in raw else json_text(a)
                for name, a in arrays.items()
            }
            if len(texts) == 1:
                return '{"outputs":' + next(iter(texts.values())) + "}"
            fields = ",".join(json.dumps(name) + ":" + text for name, text in texts.items())
            return '{"outputs":{' + fields + "}}"
        if any(a.ndim == 0 or len(a) != len(instances) for a in arrays.values()):
            raise RequestError(
                "The row format ('instances') needs every output to have the batch dimension; "
                "use the columnar format ('inputs')."
            )
        columns = {
            name: json.loads(_bytes_text(raw[name])) if name in raw else a.tolist()
            for name, a in arrays.items()
        }
        if len(columns) == 1:
            return {"predictions": next(iter(columns.values()))}
        return {
            "predictions": [
                dict(zip(columns, row, strict=True)) for row in zip(*columns.values(), strict=True)
            ]
        }

    def status(self):
        return {
            "model_version_status": [
                {
                    "version": str(self.version),
                    "state": "AVAILABLE",
                    "status": {"error_code": "OK", "error_message": ""},
                }
            ]
        }

    def describe(self):
        return {
            "model_spec": {"name": self.name, "signature_name": "", "version": str(self.version)},
            "metadata": {"signature_def": {"signature_def": self.metadata}},
        }


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True
    server_version = "resmem-tf-server"
    timeout = 300  # seconds an idle kept-alive connection holds its thread
    model = None  # set on a subclass by `make_server`

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        pass

    def _send(self, status, payload):
        if isinstance(payload, str):  # JSON text already
            body = payload.encode()
        else:
            body = json.dumps(payload, separators=(",", ":")).encode()
        reason = self.responses.get(status, ("",))[0]
        lines = [
            f"HTTP/1.1 {status} {reason}",
            "Content-Type: application/json",
            f"Content-Length: {len(body)}",
        ]
        if self.close_connection:
            lines.append("Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode()
        self.wfile.write(head + body)  # one write: no wait on Nagle and delayed ACKs

    def _model_for(self, name, version):
        if name != self.model.name or (version is not None and int(version) != self.model.version):
            raise RequestError(
                f"Servable not found for request: Specific({name}, {version}). This server "
                f"serves {self.model.name!r} version {self.model.version}.",
                404,
            )
        return self.model

    def _answer(self, method):
        try:
            if method == "POST":
                match = _PREDICT.match(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                if length < 0 or length > _MAX_BODY:
                    raise RequestError(f"Content-Length {length} out of range.", 413)
                body = self.rfile.read(length)
                if match is None:
                    raise RequestError(f"Malformed request: POST {self.path}", 404)
                model = self._model_for(match.group(1), match.group(2))
                if match.group(3) != "predict":
                    raise RequestError(f"Only :predict is served here, not :{match.group(3)}.")
                try:
                    request = json.loads(body)
                except (ValueError, UnicodeDecodeError) as error:
                    raise RequestError(f"The request is not JSON: {error}") from error
                self._send(200, model.predict(request))
            else:
                match = _MODEL.match(self.path)
                if match is None:
                    raise RequestError(f"Malformed request: GET {self.path}", 404)
                model = self._model_for(match.group(1), match.group(2))
                self._send(200, model.describe() if match.group(3) else model.status())
        except RequestError as error:
            self._send(error.status, {"error": str(error)})
        except Exception as error:  # noqa: BLE001 - the server must answer, and keep serving
            self._send(500, {"error": f"{type(error).__name__}: {error}"})

    def do_POST(self):  # noqa: N802 - the base class's name
        self._answer("POST")

    def do_GET(self):  # noqa: N802 - the base class's name
        self._answer("GET")


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


def make_server(model_dir, model_name="default", host="127.0.0.1", port=8501):
    """A server (not yet serving) of the SavedModel at `model_dir`; `port=0` picks a free one."""
    path, version = _version_dir(model_dir)
    model = Model(path, model_name, version)
    handler = type("ModelHandler", (Handler,), {"model": model})
    return Server((host, port), handler)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model_dir", required=True, help="a SavedModel, or numbered versions")
    parser.add_argument("--model_name", default="default", help="the name in the model's URL")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8501, help="0: any free port")
    parser.add_argument("--intra_op_threads", type=int, default=0, help="0: TensorFlow's choice")
    parser.add_argument("--inter_op_threads", type=int, default=0, help="0: TensorFlow's choice")
    args = parser.parse_args(argv)
    tf.config.threading.set_intra_op_parallelism_threads(args.intra_op_threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.inter_op_threads)
    server = make_server(args.model_dir, args.model_name, args.host, args.port)
    host, port = server.server_address[:2]
    print(f"READY http://{host}:{port}/v1/models/{args.model_name}", flush=True)
    try:
        server.serve_forever(poll_interval=0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
