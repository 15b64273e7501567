"""The explorer's web app: server-rendered pages (FastAPI + Jinja, the report's components), a JSON
twin of the model-backed views, and the limits that make it safe to leave running.

Safety: the server knows the studies named at start by an id; a request names ids and integers,
never a path, so nothing in a URL reaches the file system. Runs are only read. Model-backed requests
are bounded (characters, contexts) and rate-limited per client. `trust_remote_code` only when the
command line asked for it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from fastapi import Request  # at module level: the routes' annotations are resolved from here

from deepseemoe.errors import DeepSeeMoEError
from deepseemoe.explore.live import Intervention, Limits, LiveModel
from deepseemoe.explore.views import NotServed, StudyView, url_id

MAX_QUERY = 200  # characters of a search


@dataclass
class RateLimit:
    """Token bucket per client: `rate` model-backed requests per second, bursts of `burst`."""

    rate: float = 2.0
    burst: int = 6
    _buckets: dict[str, tuple[float, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def allow(self, client: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[client] = (tokens, now)
                return False
            self._buckets[client] = (tokens - 1.0, now)
            return True


@dataclass
class Explorer:
    """The served studies and their models."""

    studies: dict[str, StudyView]
    models: dict[str, LiveModel]  # study key -> its model (shared between studies of one model)
    rate: RateLimit
    _coders: dict = field(default_factory=dict)  # (study, dictionary) -> (coder, site), loaded once

    @classmethod
    def open(cls, paths: list[Path], *, model: str | None = None, device: str | None = None, dtype: str | None = None,
             trust_remote_code: bool = False, limits: Limits | None = None, rate: RateLimit | None = None) -> Explorer:
        studies: dict[str, StudyView] = {}
        for path in paths:
            key = base = url_id(Path(path).resolve().name)
            n = 1
            while key in studies:
                n += 1
                key = f"{base}-{n}"
            studies[key] = StudyView(key, Path(path))
        models: dict[str, LiveModel] = {}
        by_ref: dict[tuple[str, int], LiveModel] = {}
        for key, view in studies.items():
            ref = model or view.run.meta.get("model")
            if not ref:
                continue
            ctx = int(view.run.meta.get("ctx_len") or 256)
            if (ref, ctx) not in by_ref:
                by_ref[(ref, ctx)] = LiveModel(str(ref), device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                               limits=replace(limits or Limits(), ctx_len=ctx))
            models[key] = by_ref[(ref, ctx)]
        return cls(studies, models, rate or RateLimit())

    def warm(self) -> None:
        """Parse what a first page would otherwise wait for (examples, descriptions); `serve` runs
        this in a background thread at start."""
        for view in self.studies.values():
            view.warm()

    def study(self, key: str) -> StudyView:
        if key not in self.studies:
            raise NotServed(f"no study {key!r} is served; served: {', '.join(self.studies)}")
        return self.studies[key]

    def model(self, key: str) -> LiveModel:
        if key not in self.models:
            raise DeepSeeMoEError("this run records no model to run text through; start the server with --model")
        return self.models[key]

    def feature_edit(self, view: StudyView, dictionary: str):
        """(coder, site) of a mapped single-site SAE, for playground feature edits."""
        from deepseemoe.capture.core import Site
        from deepseemoe.dictionaries.formats import load_run_dictionary

        d = view.dictionary(dictionary)
        if (view.key, dictionary) not in self._coders:  # a wide coder is a GB to read and hash: once
            coder, meta = load_run_dictionary(d.run.path, d.name)
            self._coders[(view.key, dictionary)] = (coder, Site(*meta["source"][0]))
        return self._coders[(view.key, dictionary)]


def parse_experts(text: str | None) -> list[int]:
    if not text:
        return []
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        raise DeepSeeMoEError(f"experts {text!r} are not a comma-separated list of integers") from None


def parse_number(text: str | None, kind: type, what: str):
    """A form field as a number; an empty field is None (forms send every field, filled or not)."""
    if text is None or not str(text).strip():
        return None
    try:
        return kind(str(text).strip())
    except ValueError:
        raise DeepSeeMoEError(f"{what} {text!r} is not a number") from None


def create_app(explorer: Explorer):
    """The ASGI app over `explorer`."""
    import jinja2
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response

    app = FastAPI(title="DeepSeeMoE explorer", docs_url=None, redoc_url=None, openapi_url=None)
    env = jinja2.Environment(loader=jinja2.ChoiceLoader([jinja2.PackageLoader("deepseemoe.explore", "templates"),
                                                         jinja2.PackageLoader("deepseemoe.report", "templates")]),
                             autoescape=jinja2.select_autoescape(["html", "j2"]))

    def page(name: str, status: int = 200, **context) -> HTMLResponse:
        html = env.get_template(name).render(studies=explorer.studies, **context)
        return HTMLResponse(html, status_code=status)

    def error(view: StudyView | None, message: str, status: int) -> HTMLResponse:
        return page("error.html.j2", status=status, view=view, message=message)

    def guarded(fn):
        """One error line instead of a traceback: what is not served → 404, bad input → 400 (anything
        else is a bug, and FastAPI answers 500)."""
        import functools

        api = fn.__name__.startswith("api_")

        @functools.wraps(fn)
        async def wrapper(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except (NotServed, DeepSeeMoEError) as exc:
                status = 404 if isinstance(exc, NotServed) else 400
                message = str(exc)
                if api:
                    return JSONResponse({"error": message}, status_code=status)
                return error(explorer.studies.get(kwargs.get("key", "")), message, status)
        return wrapper

    def limited(request: Request) -> bool:
        return not explorer.rate.allow(request.client.host if request.client else "?")

    too_many = "too many requests to the model; wait a moment"

    @app.get("/", response_class=HTMLResponse)
    async def index():
        if len(explorer.studies) == 1:
            return RedirectResponse(f"/s/{next(iter(explorer.studies))}")
        return page("index.html.j2")

    @app.get("/s/{key}", response_class=HTMLResponse)
    @guarded
    async def overview(key: str, layer: int | None = None):
        def build(layer):
            view = explorer.study(key)
            layer = view.layers[len(view.layers) // 2] if layer is None else layer
            if layer not in view.layers:
                raise DeepSeeMoEError(f"layer {layer} is not a MoE layer; MoE layers: {view.layers}")
            return page("overview.html.j2", view=view, layer=layer, load=view.load_heatmap(),
                        domains=view.domain_heatmap(layer), coactivation=view.coactivation_heatmap(layer),
                        documents=view.first_documents(), summary=view.analyses.summary if view.analyses else None,
                        model=explorer.models.get(key))
        return await _threaded(build, layer)

    @app.get("/s/{key}/figure/{name}.png")
    @guarded
    async def figure(key: str, name: str):
        view = explorer.study(key)
        if view.analyses is None or f"{name}.png" not in view.analyses.manifest.files:
            raise NotServed(f"no figure {name!r} in this run's analyses")
        return Response(view.analyses.figure(name), media_type="image/png")

    def graphed(key: str, dictionary: str):
        """(study, dictionary view) of a dictionary whose graph `graph` wrote; NotServed otherwise."""
        view = explorer.study(key)
        d = view.dictionaries.get(view.dictionary_aliases.get(dictionary, dictionary))
        if d is None or d.graph is None:
            raise NotServed(f"no graph for {dictionary!r}")
        return view, d

    @app.get("/s/{key}/graph/{dictionary}.png")
    @guarded
    async def graph_figure(key: str, dictionary: str):
        _, d = graphed(key, dictionary)
        path = d.run.graph_figure(d.name)
        if path is None:
            raise NotServed(f"no graph layout for {dictionary!r}")
        return Response(path.read_bytes(), media_type="image/png")

    @app.get("/s/{key}/graph/{dictionary}", response_class=HTMLResponse)
    @guarded
    async def graph_page(key: str, dictionary: str):
        view, d = graphed(key, dictionary)
        return page("graph.html.j2", view=view, d=d)

    @app.get("/api/s/{key}/graph/{dictionary}")
    @guarded
    async def api_graph(key: str, dictionary: str):
        view, d = graphed(key, dictionary)
        return await _threaded(lambda: d.graph_data(view.key))

    @app.get("/s/{key}/attribution/{graph}", response_class=HTMLResponse)
    @guarded
    async def attribution(key: str, graph: str):
        from deepseemoe.report.graph_svg import LEGEND

        view = explorer.study(key)
        entry, svg = await _threaded(lambda: view.attribution_page(graph))
        return page("attribution.html.j2", view=view, g=entry, svg=svg, legend=LEGEND)

    @app.get("/s/{key}/doc/{doc}", response_class=HTMLResponse)
    @guarded
    async def document(key: str, doc: int, start: int = 0):
        view = explorer.study(key)
        return await _threaded(lambda: page("document.html.j2", view=view, doc=doc, start=start,
                                            strip=view.document(doc, start)))

    @app.get("/s/{key}/expert/{layer}/{expert}", response_class=HTMLResponse)
    @guarded
    async def expert(key: str, layer: int, expert: int):
        view = explorer.study(key)
        return await _threaded(lambda: page("expert.html.j2", view=view, p=view.expert_page(layer, expert)))

    @app.get("/s/{key}/feature/{dictionary}/{feature}", response_class=HTMLResponse)
    @guarded
    async def feature(key: str, dictionary: str, feature: int):
        view = explorer.study(key)
        return await _threaded(lambda: page("feature.html.j2", view=view, p=view.feature_page(dictionary, feature)))

    @app.get("/s/{key}/search", response_class=HTMLResponse)
    @guarded
    async def search(key: str, q: str = ""):
        view = explorer.study(key)
        q = q[:MAX_QUERY]
        return await _threaded(lambda: page("search.html.j2", view=view, q=q, hits=view.search(q) if q else []))

    @app.get("/s/{key}/compare", response_class=HTMLResponse)
    @guarded
    async def compare(key: str):
        from deepseemoe.report.tables import comparison_table, removal_table

        view = explorer.study(key)
        result, removal = view.study.comparison, view.study.removal
        if result is None and removal is None:
            raise DeepSeeMoEError("this study has no comparison and no removal; run `deepseemoe compare` or "
                                  "`deepseemoe ablate --target` (the demo runs both)")
        units = sorted((result or {}).get("moe", {}).get("ablation", {}).get("expert", []), key=lambda u: -u["gap"])
        return page("compare.html.j2", view=view, table=comparison_table(result) if result else None,
                    units=units[:32], removal=removal_table(removal) if removal else None)

    def _route(key: str, text: str):
        view = explorer.study(key)
        return view, explorer.model(key).route(text)

    @app.get("/s/{key}/text", response_class=HTMLResponse)
    @guarded
    async def text_view(request: Request, key: str, text: str = ""):
        view = explorer.study(key)
        if not text:
            return page("text.html.j2", view=view, text="", routed=None)
        if limited(request):
            return error(view, too_many, 429)
        _, routed = await _threaded(_route, key, text)
        return page("text.html.j2", view=view, text=text, routed=routed)

    @app.get("/api/s/{key}/route")
    @guarded
    async def api_route(request: Request, key: str, text: str):
        if limited(request):
            return JSONResponse({"error": too_many}, status_code=429)
        _, routed = await _threaded(_route, key, text)
        return JSONResponse({"tokens": routed.tokens, "token_ids": routed.token_ids,
                             "experts": {str(k): v for k, v in routed.experts.items()},
                             "seconds": routed.seconds, "tokens_per_second": routed.tokens_per_second})

    def _playground(key: str, text: str, op: str, layer: str, experts: str | None, dictionary: str | None,
                    feature: str, scale: str):
        view = explorer.study(key)
        intervention = Intervention(op, parse_number(layer, int, "layer"), parse_experts(experts), dictionary,
                                    parse_number(feature, int, "feature"), parse_number(scale, float, "scale") or 0.0)
        coder = site = None
        if op == "feature":
            if not dictionary or feature is None:
                raise DeepSeeMoEError("a feature intervention needs a dictionary and a feature number")
            coder, site = explorer.feature_edit(view, dictionary)
        return explorer.model(key).intervene(text, intervention, coder, site)

    @app.get("/s/{key}/playground", response_class=HTMLResponse)
    @guarded
    async def playground(request: Request, key: str, text: str = "", op: str = "ablate", layer: str = "",
                         experts: str = "", dictionary: str = "", feature: str = "", scale: str = "0"):
        view = explorer.study(key)
        chosen = parse_number(layer, int, "layer")
        form = {"text": text, "op": op, "layer": view.layers[0] if chosen is None else chosen, "experts": experts,
                "dictionary": dictionary, "feature": feature, "scale": scale}
        if not text:
            return page("playground.html.j2", view=view, form=form, result=None)
        if limited(request):
            return error(view, too_many, 429)
        result = await _threaded(_playground, key, text, op, layer, experts, dictionary or None, feature, scale)
        return page("playground.html.j2", view=view, form=form, result=result)

    @app.get("/api/s/{key}/playground")
    @guarded
    async def api_playground(request: Request, key: str, text: str, op: str = "ablate", layer: str = "",
                             experts: str = "", dictionary: str = "", feature: str = "", scale: str = "0"):
        if limited(request):
            return JSONResponse({"error": too_many}, status_code=429)
        r = await _threaded(_playground, key, text, op, layer, experts, dictionary or None, feature, scale)
        return JSONResponse({"intervention": r.intervention.describe(), "delta_ce": r.delta_ce, "kl": r.kl,
                             "predictions": r.predictions, "changed_share": {str(k): v for k, v in r.changed_share.items()},
                             "next_clean": r.next_clean, "next_edited": r.next_edited, "seconds": r.seconds,
                             "fired": r.fired})

    return app


async def _threaded(fn, *args):
    """Run a blocking call (a forward, a table read) off the event loop."""
    import anyio

    return await anyio.to_thread.run_sync(lambda: fn(*args))
