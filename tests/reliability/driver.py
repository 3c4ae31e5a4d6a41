"""A deterministic federation driven over plain HTTP, for fault-injection and race tests.

Every client's delta is a known function of (client, round), so the expected global adapter
can be computed by hand and compared with what the server produced.
"""

from __future__ import annotations

import time
from collections import defaultdict

import requests
import torch
from safetensors.torch import load

from fedllm.wire import encode


def delta_for(shape: list[int], client_index: int, round_number: int) -> torch.Tensor:
    base = torch.arange(int(torch.Size(shape).numel()), dtype=torch.float32).reshape(shape) % 7
    return (base + client_index + 1) * 0.01 * round_number


class HttpFederationDriver:
    """Joins the clients, then pushes each sampled client's delta until the federation finishes."""

    def __init__(self, clients: dict[str, int]):
        self.clients = clients  # client id -> num_samples
        self.index = {c: i for i, c in enumerate(clients)}
        self.accepted: dict[int, set[str]] = defaultdict(set)  # round -> clients answered 202
        self.spec: dict[str, list[int]] | None = None
        self.initial: dict[str, torch.Tensor] | None = None

    def _call(self, url: str, method: str, path: str, client: str, **kwargs) -> requests.Response:
        headers = {"X-FedLLM-Client": client, **kwargs.pop("headers", {})}
        return requests.request(method, url + path, headers=headers, timeout=30, **kwargs)

    def body(self, client: str, round_number: int) -> bytes:
        tensors = {k: delta_for(s, self.index[client], round_number) for k, s in self.spec.items()}
        return encode(tensors, metadata={"train_loss": str(1.0 + self.index[client])})

    def join_all(self, url: str) -> dict:
        """Fetch the upload spec, join every client (idempotent); return the round status."""
        first = next(iter(self.clients))
        if self.spec is None:
            self.spec = self._call(url, "GET", "/v1/config", first).json()["upload_tensors"]
        for client, n in self.clients.items():
            self._call(url, "POST", "/v1/join", client, json={"num_samples": n}).raise_for_status()
        status = self._call(url, "GET", "/v1/round", first).json()
        if self.initial is None and status["global_version"] == 0:
            self.initial = load(self._call(url, "GET", "/v1/global", first).content)
        return status

    def step(self, url: str) -> bool:
        """One pass; True when finished. Raises requests.RequestException when the server is gone."""
        status = self.join_all(url)
        if status["phase"] == "finished":
            return True
        if status["phase"] == "training":
            for client in status["sampled"]:
                if client in status["received"]:
                    continue
                reply = self._call(url, "POST", f"/v1/update?round={status['round']}", client,
                                   data=self.body(client, status["round"]),
                                   headers={"X-FedLLM-Num-Samples": str(self.clients[client])})
                if reply.status_code == 202:
                    self.accepted[status["round"]].add(client)
                elif reply.status_code != 409:  # 409: the round moved on meanwhile
                    raise AssertionError(f"unexpected {reply.status_code}: {reply.text}")
        return False

    def run(self, url: str, timeout: float = 60.0, alive=lambda: True) -> bool:
        """Drive until finished (True) or the server dies (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if self.step(url):
                    return True
            except requests.RequestException:
                if not alive():
                    return False
            time.sleep(0.05)
        raise TimeoutError("the federation did not finish")

    def expected_final(self, history: list[dict]) -> dict[str, torch.Tensor]:
        """w_R = w_0 + Σ_r Σ_{i∈S_r} (n_i / n_S) Δ_i(r), from the participants the server recorded."""
        expected = {k: v.clone().double() for k, v in self.initial.items()}
        for record in history:
            total = sum(self.clients[c] for c in record["participants"])
            for client in record["participants"]:
                weight = self.clients[client] / total
                for name, shape in self.spec.items():
                    expected[name] += weight * delta_for(shape, self.index[client], record["round"]).double()
        return {k: v.float() for k, v in expected.items()}
