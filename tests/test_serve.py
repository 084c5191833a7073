"""Ray Serve over real HTTP: one application per module on the session's Ray cluster, models from a real MLflow
registry (sqlite), requests through Serve's real proxy on 127.0.0.1.

The models are tiny random-weight ViTs registered as two versions of ``tiny``: what matters here is that the served
probabilities are exactly the offline ones, whichever version, batch or decode path produced them.
"""
from __future__ import annotations

import concurrent.futures as cf
import socket
import threading
import time

import numpy as np
import pytest
import requests
from PIL import Image

from imagegen import encode, rgb

pytestmark = pytest.mark.slow

TOKEN = "s3cret-token"
ARCH = {"name": "vit_pico_patch4_28", "num_classes": 3, "img_size": 28, "pos_embed": "learned",
        "global_pool": "token", "in_chans": 3}
PRE = {"img_size": 28, "mean": [0.5] * 3, "std": [0.5] * 3, "crop_pct": 0.875, "interpolation": "bicubic"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export(folder, seed: int):
    import torch

    from vitray.models import create_model
    from vitray.models.export import save_export

    torch.manual_seed(seed)
    model = create_model(ARCH["name"], num_classes=3)
    return save_export(folder, model.state_dict(), model=ARCH, task="classification", class_names=["ant", "bee", "cow"],
                       preprocessing=PRE, metrics={"val/top1": 0.5 + seed / 10})


class Served:
    def __init__(self, root, ray_cluster):
        from vitray.config import TrackingConfig, parse_config
        from vitray.serve import app
        from vitray.tracking.registry import log_and_register

        self.tracking_uri = f"sqlite:///{root}/mlflow.db"
        track = TrackingConfig(uri=self.tracking_uri, registered_model="tiny")
        self.v1 = log_and_register(str(_export(root / "v1", 1)), track)
        self.v2_export = _export(root / "v2", 2)
        (root / "token").write_text(TOKEN + "\n")
        self.token_file = root / "token"
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.cfg = parse_config({
            "tracking": {"uri": self.tracking_uri},
            # two models: the routed layout (a router ingress + one deployment per model), decoding in the ingress
            "serve": {"port": self.port, "models": [{"name": "tiny", "uri": "models:/tiny@champion"},
                                                    {"name": "first", "uri": "models:/tiny/1"}],
                      "decode": "ingress", "max_batch_size": 16, "batch_wait_timeout_s": 0.05, "precision": "fp32",
                      "cpus_per_replica": 1, "ingress_cpus": 0.25, "max_body_bytes": 1_000_000,
                      "max_pixels": 4_000_000, "auth_token_file": str(self.token_file)}})
        self.pins, _ = app.deploy(self.cfg)
        self.session = requests.Session()
        self.session.headers["authorization"] = f"Bearer {TOKEN}"

    def post(self, body, ctype="image/png", session=None, **params):
        return (session or self.session).post(f"{self.url}/v1/classify", data=body, params=params,
                                              headers={"content-type": ctype} if ctype else {}, timeout=60)


@pytest.fixture(scope="module")
def served(ray_cluster, tmp_path_factory):
    from ray import serve

    s = Served(tmp_path_factory.mktemp("serve"), ray_cluster)
    yield s
    serve.shutdown()  # frees the replicas' CPUs for the next module


def _pyfunc_probs(tracking_uri: str, uri: str, images: list[bytes]) -> np.ndarray:
    import mlflow
    import pandas as pd

    from vitray.tracking.uris import tracking_scope

    with tracking_scope(tracking_uri):
        model = mlflow.pyfunc.load_model(uri)
    return np.stack(model.predict(pd.DataFrame({"image": images}))["probs"].to_list())


IMAGES = [encode(rgb(i, size=(40 + i, 30 + 2 * i)), "PNG" if i % 2 else "JPEG") for i in range(12)]


def test_served_probabilities_equal_the_registered_pyfunc(served):
    expected = _pyfunc_probs(served.tracking_uri, "models:/tiny/1", IMAGES)
    got = []
    for i, img in enumerate(IMAGES):
        r = served.post(img, "image/png" if i % 2 else "image/jpeg", probs="true", top_k=2)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"] == "tiny" and body["version"] == "1" and body["alias"] == "champion"
        assert len(body["predictions"]) == 2 and body["predictions"][0]["score"] >= body["predictions"][1]["score"]
        assert body["predictions"][0]["name"] == ["ant", "bee", "cow"][int(np.argmax(body["probs"]))]
        got.append(body["probs"])
    assert np.abs(np.asarray(got) - expected).max() <= 1e-5
    # multipart form upload: the same answer
    r = served.session.post(f"{served.url}/v1/classify", params={"probs": "true"},
                            files={"file": ("x.png", IMAGES[1], "image/png")}, timeout=60)
    assert r.status_code == 200 and np.abs(np.asarray(r.json()["probs"]) - expected[1]).max() <= 1e-5

    r = served.post(IMAGES[2], "image/jpeg", model="first", probs="true")
    assert r.json()["model"] == "first" and np.abs(np.asarray(r.json()["probs"]) - expected[2]).max() <= 1e-5
    info = served.session.get(f"{served.url}/v1/models", timeout=30).json()["models"]
    assert [(m["name"], m["version"], m["alias"], m["classes"], m["input_size"], m["max_batch_size"])
            for m in info] == [("tiny", "1", "champion", ["ant", "bee", "cow"], 28, 16),
                               ("first", "1", None, ["ant", "bee", "cow"], 28, 16)]
    assert requests.get(f"{served.url}/healthz", timeout=30).json()["status"] == "ok"  # no token needed
    spec = requests.get(f"{served.url}/openapi.json", timeout=30).json()
    assert {"/v1/classify", "/v1/models", "/healthz"} <= set(spec["paths"])
    assert "image/*" in spec["paths"]["/v1/classify"]["post"]["requestBody"]["content"]


def _odd_modes() -> dict[str, bytes]:
    base = np.asarray(rgb(7, size=(33, 29)))
    out = {"cmyk-jpeg": encode(Image.fromarray(base).convert("CMYK"), "JPEG"),
           "16-bit-png": encode(Image.fromarray(base[:, :, 0].astype(np.uint16) * 257), "PNG"),
           "la-png": encode(Image.fromarray(base).convert("LA"), "PNG"),
           "1-bit-png": encode(Image.fromarray(base).convert("1"), "PNG"),
           "webp": encode(Image.fromarray(base), "WEBP")}
    pal = Image.fromarray(base).convert("P")
    pal.info["transparency"] = 0
    out["palette-transparent-png"] = encode(pal, "PNG", transparency=0)
    return out


def test_bad_input_gets_4xx_json_and_the_server_keeps_serving(served):
    good = IMAGES[0]
    bomb = encode(Image.new("1", (2500, 2000)), "PNG")  # 5 MP > the 4 MP cap, a few kB on the wire
    cases = [
        ("not an image", lambda: served.post(b"this is not an image", "image/png"), 400, "not an image"),
        ("zero bytes", lambda: served.post(b"", "image/jpeg"), 400, "0 bytes"),
        ("truncated png", lambda: served.post(IMAGES[1][: len(IMAGES[1]) // 2], "image/png"), 400, "truncated"),
        ("truncated jpeg", lambda: served.post(good[: len(good) // 2], "image/jpeg"), 400, ""),
        ("wrong content type", lambda: served.post(good, "application/json"), 415, "content type"),
        ("no content type", lambda: served.post(good, None), 415, "content type"),
        ("text file part", lambda: served.session.post(f"{served.url}/v1/classify", timeout=60,
                                                      files={"file": ("a.txt", b"hello", "text/plain")}), 415, ""),
        ("body over the limit", lambda: served.post(b"\xff" * 1_200_000, "image/jpeg"), 413, "over the limit"),
        ("chunked body over the limit", lambda: served.post((b"\x00" * 100_000 for _ in range(12)), "image/png"),
         413, "over the limit"),
        ("decompression bomb", lambda: served.post(bomb, "image/png"), 413, "too many pixels"),
        ("top_k=0", lambda: served.post(good, "image/jpeg", top_k=0), 400, "top_k"),
        ("top_k=abc", lambda: served.post(good, "image/jpeg", top_k="abc"), 400, "top_k"),
        ("unknown model", lambda: served.post(good, "image/jpeg", model="nope"), 404, "nope"),
        ("unknown route", lambda: served.session.get(f"{served.url}/v2/everything", timeout=30), 404, "no route"),
        ("wrong method", lambda: served.session.get(f"{served.url}/v1/classify", timeout=30), 405, "not allowed"),
    ]
    for name, send, status, words in cases:
        r = send()
        assert r.status_code == status, (name, r.status_code, r.text)
        assert r.headers["content-type"].startswith("application/json"), name
        body = r.json()
        assert set(body) == {"error"} and words.lower() in body["error"].lower(), (name, body)
        assert "Traceback" not in r.text
        ok = served.post(good, "image/jpeg")
        assert ok.status_code == 200, (name, ok.text)
    for name, data in _odd_modes().items():  # unusual but valid images are converted, not refused
        r = served.post(data, "image/png")
        assert r.status_code == 200, (name, r.text)


def test_200_concurrent_requests_all_correct_and_batched(served):
    images = [encode(rgb(100 + i, size=(24, 24)), "PNG") for i in range(200)]
    expected = _pyfunc_probs(served.tracking_uri, "models:/tiny/1", images)

    def one(i):
        s = requests.Session()
        s.headers["authorization"] = f"Bearer {TOKEN}"
        r = served.post(images[i], "image/png", session=s, probs="true")
        return i, r.status_code, r.json(), int(r.headers.get("x-vitray-batch-size", 0))

    with cf.ThreadPoolExecutor(64) as pool:
        results = list(pool.map(one, range(200)))
    assert [status for _, status, _, _ in results] == [200] * 200
    got = np.asarray([body["probs"] for _, _, body, _ in results])
    assert np.abs(got - expected).max() <= 1e-5
    assert all(body["predictions"][0]["label"] == int(np.argmax(expected[i])) for i, _, body, _ in results)
    sizes = [b for *_, b in results]
    assert max(sizes) > 1 and np.mean(sizes) > 2, f"batches did not form: {sorted(sizes)}"
    assert max(sizes) <= 16


def test_bearer_token_from_a_file_missing_or_wrong_is_401(served):
    anonymous = requests.Session()
    r = served.post(IMAGES[0], "image/jpeg", session=anonymous)
    assert r.status_code == 401 and "missing bearer token" in r.json()["error"]
    assert r.headers["www-authenticate"].startswith("Bearer")
    anonymous.headers["authorization"] = "Bearer not-the-token"
    assert served.post(IMAGES[0], "image/jpeg", session=anonymous).status_code == 401
    assert anonymous.get(f"{served.url}/v1/models", timeout=30).status_code == 401
    assert served.post(IMAGES[0], "image/jpeg").status_code == 200
    # a rotated Secret: the file changes, the new token works and the old one stops working
    time.sleep(0.01)
    try:
        served.token_file.write_text("rotated-token")
        rotated = requests.Session()
        rotated.headers["authorization"] = "Bearer rotated-token"
        assert served.post(IMAGES[0], "image/jpeg", session=rotated).status_code == 200
        assert served.post(IMAGES[0], "image/jpeg").status_code == 401
    finally:
        served.token_file.write_text(TOKEN)
    assert served.post(IMAGES[0], "image/jpeg").status_code == 200
    # multipart without Content-Length (chunked): refused before the form parser spools it
    r = served.post(iter([b"--x\r\n"]), "multipart/form-data; boundary=x")
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]


def test_reload_after_the_alias_moves_switches_versions_with_no_failed_request(served):
    from vitray.config import TrackingConfig
    from vitray.serve import app
    from vitray.tracking.registry import log_and_register, set_alias
    from vitray.tracking.uris import client_for

    reg = log_and_register(str(served.v2_export), TrackingConfig(uri=served.tracking_uri, registered_model="tiny"))
    assert reg.version == "2"
    set_alias(client_for(served.tracking_uri), "tiny", "2", "champion")
    expected = {v: _pyfunc_probs(served.tracking_uri, f"models:/tiny/{v}", IMAGES[:4]) for v in ("1", "2")}
    assert np.abs(expected["1"] - expected["2"]).max() > 1e-3  # the versions are distinguishable

    log, stop, errors = [], threading.Event(), []

    def load(k):
        s = requests.Session()
        s.headers["authorization"] = f"Bearer {TOKEN}"
        i = 0
        while not stop.is_set():
            try:
                r = served.post(IMAGES[i % 4], "image/jpeg" if i % 2 == 0 else "image/png", session=s, probs="true")
                body = r.json()
                log.append((time.time(), r.status_code, body.get("version"), i % 4, body.get("probs")))
            except Exception as err:  # noqa: BLE001 - any failure is a failed request
                errors.append(repr(err))
            i += 1

    threads = [threading.Thread(target=load, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    time.sleep(1.0)
    changes = app.reload(served.cfg)
    switched = time.time()
    time.sleep(1.5)
    stop.set()
    for t in threads:
        t.join(60)
    assert changes == [("tiny", "1", "2"), ("first", "1", "1")]
    assert not errors and [c for _, c, *_ in log if c != 200] == []
    versions = [v for _, _, v, *_ in log]
    assert "1" in versions and "2" in versions
    assert all(v == "2" for t, _, v, *_ in log if t > switched + 0.2)  # after reload returns, only the new version
    for _, _, v, idx, probs in log:  # every answer is exactly its version's
        assert np.abs(np.asarray(probs) - expected[v][idx]).max() <= 1e-5
    info = served.session.get(f"{served.url}/v1/models", timeout=30).json()["models"]
    assert [(m["version"], m["alias"]) for m in info] == [("2", "champion"), ("1", None)]


def test_rendered_serve_config_deploys_the_same_app(served):
    """The config-file path a RayService takes: `vitray serve config` output, deployed the way `serve run
    config.yaml` does (the controller builds the app from import_path + args and applies the deployment options),
    here for one model, which runs inside the ingress replica (decoded there, in the request path)."""
    import yaml
    from ray.serve._private.api import _get_global_client
    from ray.serve.schema import ServeDeploySchema

    from vitray.cli import main
    from vitray.serve import app
    from vitray.tracking.uris import client_for

    champion = str(client_for(served.tracking_uri).get_model_version_by_alias("tiny", "champion").version)
    out = served.token_file.parent / "serve.yaml"
    assert main(["serve", "config", "--model", "models:/tiny@champion", "--pin", "--tracking-uri",
                 served.tracking_uri, "--port", str(served.port), "--set", "serve.precision=fp32", "-o", str(out)]) == 0
    config = yaml.safe_load(out.read_text())
    application = config["applications"][0]
    assert application["import_path"] == app.IMPORT_PATH
    (ingress,) = application["deployments"]
    assert ingress["name"] == "ingress" and ingress["max_ongoing_requests"] == 32
    assert ingress["user_config"]["models"]["tiny"]["model"]["uri"] == f"models:/tiny/{champion}"
    assert application["args"]["pins"] == {}  # pins only in user_config: re-rendering is a reconfigure
    _get_global_client().deploy_apps(ServeDeploySchema.model_validate(config), _blocking=True)
    app._wait_running()
    expected = _pyfunc_probs(served.tracking_uri, f"models:/tiny/{champion}", IMAGES)
    for i, img in enumerate(IMAGES):
        r = requests.post(f"{served.url}/v1/classify", data=img, params={"probs": "true"}, timeout=60,
                          headers={"content-type": "image/jpeg"})  # no auth in this config
        assert r.status_code == 200, r.text
        assert r.json()["version"] == champion and np.abs(np.asarray(r.json()["probs"]) - expected[i]).max() <= 1e-5
    r = requests.post(f"{served.url}/v1/classify", data=b"garbage", headers={"content-type": "image/png"}, timeout=60)
    assert r.status_code == 400 and "not an image" in r.json()["error"]
