"""GRU4Rec's optional fast CPU training path: forward + hand-written backward + optimizer
update for one session-parallel mini-batch (no autograd), and the epoch runner around it.

The reference is the autograd ``GRU4RecModel.forward`` (training/families/gru4rec.py);
these paths are tested equal to it (tests/training/test_gru4rec_fast.py,
tests/training/test_native_kernels.py). Chosen once, at construction, by the family's
``train_path`` (``chunk`` | ``native`` | ``manual``; see ``training.families.gru4rec``):

* ``native``: :class:`FastStep` with the C kernels (training/native/kernels.c) per step;
* ``chunk``: the full-batch steps of each 256-step chunk in ONE C call (``rnn_train_chunk``),
  tail steps per step as in ``native``;
* ``manual``: :class:`FastStep` in torch ops only (no C; the earlier CUDA path).

On 2 CPU cores autograd's per-op bookkeeping costs more than the arithmetic at batch 32
(benchmarks/README_gru4rec.md), hence the hand-written backward. Every raw pointer handed
to C is checked first (:func:`training.native.check_tensor`): a wrong shape, dtype, device
or layout raises instead of crashing.
"""
from __future__ import annotations

import ctypes
import os
import time

import numpy as np
import torch

from training.losses import parse_activation, sampled_loss

#: the official cross-entropy's epsilon: row loss -log(p_target + XE_EPS) (kernels.c xe_row_loss)
XE_EPS = 1e-24

def chunk_activation(cfg) -> tuple[int | None, float]:
    """The whole-step path's final activation for this setting: (kind, alpha), kind None when
    it has none (cross-entropy: linear scores; bpr-max: linear or ELU with alpha > 0)."""
    from training import native

    if cfg.loss == "cross-entropy":
        return native.ACT_LINEAR, 0.0
    if cfg.final_act == "linear":
        return native.ACT_LINEAR, 0.0
    if cfg.final_act.startswith("elu-"):
        a = float(cfg.final_act.split("-", 1)[1])
        return (native.ACT_ELU, a) if a > 0 else (None, 0.0)
    return None, 0.0


class FastStep:
    """Forward + manual backward + optimizer update for one mini-batch (no autograd)."""

    def __init__(self, model, cfg, train_support: np.ndarray, device: torch.device,
                 native: bool = True, chunk: bool = True):
        """``native``: use the C kernels (CPU only; falls back to torch ops when they cannot be
        built); ``chunk``: also the whole-step C path where this configuration has it."""
        self.m = model
        self.cfg = cfg
        self.device = device
        self.B = cfg.batch_size
        self.act = parse_activation(cfg.final_act)
        self.xe = cfg.loss == "cross-entropy"
        if cfg.optimizer not in ("adagrad", "adam"):
            raise ValueError(f"optimizer must be adagrad|adam, got {cfg.optimizer!r}")
        if not 0.0 <= cfg.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {cfg.momentum}")
        # logQ: the in-batch columns were drawn ∝ support, the extra ones ∝ support^alpha
        # (official P0 = raw counts of the training table; clamp only guards items never trained on)
        logp = torch.log(torch.tensor(np.maximum(train_support, 1), dtype=torch.float32))
        self.logp = logp.to(device)
        self.logq_w = None
        if self.xe and cfg.logq > 0:
            w = torch.full((self.B + cfg.n_sample,), cfg.logq * cfg.sample_alpha)
            w[: self.B] = cfg.logq
            self.logq_w = w.to(device)
        # dense parameters live in one flat buffer so the optimizer is a handful of ops
        dense = []
        for i in range(len(model.layers)):
            for p in (model.W_ih[i], model.W_hh[i], model.b_ih[i], model.b_hh[i]):
                if p.numel():
                    dense.append(p)
        n = sum(p.numel() for p in dense)
        self.flat = torch.empty(n, device=device)
        self.gflat = torch.zeros(n, device=device)
        off = 0
        self.grad_of = {}
        for p in dense:
            k = p.numel()
            self.flat[off:off + k].copy_(p.data.reshape(-1))
            p.data = self.flat[off:off + k].view(p.shape)
            self.grad_of[id(p)] = self.gflat[off:off + k].view(p.shape)
            off += k
        # per-layer weights and their gradient slots, looked up once (ParameterList indexing and
        # .data cost ~0.2 ms per step at batch 32, measured with cProfile)
        self._layer = [tuple(t.data if j < 4 else t for j, t in enumerate((
            model.W_ih[i], model.W_hh[i], model.b_ih[i], model.b_hh[i],
            self.grad_of.get(id(model.W_ih[i])), self.grad_of[id(model.W_hh[i])],
            self.grad_of.get(id(model.b_ih[i])), self.grad_of[id(model.b_hh[i])])))
            for i in range(len(model.layers))]
        self._By = model.By.data
        self.sparse = {"Wy": model.Wy, "By": model.By}
        if model.embedding == "separate":
            self.sparse["E"] = model.E
        if model.embedding == "onehot":
            self.sparse["Wx0"] = model.Wx0
        self.opt_state = self._new_opt_state()
        self._slot = None
        self._compact = None
        self._arange = torch.arange(self.B * 2 + cfg.n_sample, device=device)
        # fused C kernels (training/native/kernels.c) on CPU; the torch ops below are the fallback
        # and the reference the kernels are tested against (tests/training/test_native_kernels.py)
        self.native = None
        self._mm = None
        if device.type == "cpu" and native:
            from training import native
            self.native = native.load()
        if self.native is not None:
            k = self.B * 2 + cfg.n_sample
            self._nslot = {}
            self._nuniq = torch.empty(k, dtype=torch.int64)
            self._ninv = torch.empty(k, dtype=torch.int64)
            self._ndby = torch.empty(k)
            self._nw = torch.empty(k)
            # GRU gate element-wise parts in C too (not for the one-hot first layer, whose
            # input is a table row); the layer's products stay in torch
            self._ngru = model.embedding != "onehot"
            self._nin = torch.empty(k, dtype=torch.uint8)
            self._nzq = torch.zeros(k)
            # the step's products through MKL's sgemm in C, independent ones on both cores at once
            self._mm = native.MatmulJobs(self.native) if getattr(self.native, "has_blas", False) else None
        # whole steps in one C call (training/native/kernels.c rnn_train_chunk) where this setting has it
        self.chunk = self._chunk_ctx() if chunk else None

    # ---- the whole-step C path ---------------------------------------------------------
    def _chunk_ctx(self):
        """``native.ChunkCtx`` for ``rnn_train_chunk``, or None when this configuration has no
        whole-step C path (it needs: CPU kernels with MKL, tied embedding, Adagrad, and either
        cross-entropy or bpr-max with a linear or ELU final activation; ``RNNREC_NATIVE_CHUNK=0``
        turns it off)."""
        m, c = self.m, self.cfg
        if self.native is None or self._mm is None or os.environ.get("RNNREC_NATIVE_CHUNK", "1") == "0":
            return None
        from training import native
        L = len(m.layers)
        act_kind, alpha = chunk_activation(c)
        if m.embedding != "tied" or c.loss not in native.LOSS_KINDS or act_kind is None \
                or c.optimizer != "adagrad" or L > native.MAXL:
            return None
        st = self.opt_state
        ctx = native.ChunkCtx()
        ctx.B, ctx.S, ctx.L, ctx.n_items = self.B, c.n_sample, L, m.n_items
        ctx.D, ctx.n_flat, ctx.nesterov = m.Wy.shape[1], self.flat.numel(), int(c.nesterov)
        mom = c.momentum > 0
        ctx.Wy, ctx.By = m.Wy.data.data_ptr(), self._By.data_ptr()
        ctx.Wy_acc, ctx.By_acc = st["Wy.acc"].data_ptr(), st["By.acc"].data_ptr()
        ctx.Wy_mom = st["Wy.mom"].data_ptr() if mom else None
        ctx.By_mom = st["By.mom"].data_ptr() if mom else None
        ctx.flat, ctx.gflat, ctx.dacc = self.flat.data_ptr(), self.gflat.data_ptr(), st["dense.acc"].data_ptr()
        ctx.dmom = st["dense.mom"].data_ptr() if mom else None
        for i in range(L):
            ctx.H[i] = m.layers[i]
            for k, t in zip(("W_ih", "W_hh", "b_ih", "b_hh", "gW_ih", "gW_hh", "gb_ih", "gb_hh"), self._layer[i]):
                getattr(ctx, k)[i] = t.data_ptr()
        # kept alive here: the context holds their addresses
        self._chunk_keep = []
        if self.logq_w is not None:
            w_in, w_ex = c.logq, c.logq * c.sample_alpha
            self._chunk_keep = [torch.exp(-w_in * self.logp), torch.exp(-w_ex * self.logp)]
            ctx.logp = self.logp.data_ptr()
            ctx.eq_in, ctx.eq_ex = (t.data_ptr() for t in self._chunk_keep)
            ctx.w_in, ctx.w_extra = w_in, w_ex
        slot = torch.full((m.n_items,), -1, dtype=torch.int64)
        self._chunk_keep.append(slot)
        ctx.slot = slot.data_ptr()
        ctx.lr, ctx.eps, ctx.momentum, ctx.inv_b = c.learning_rate, c.adagrad_eps, c.momentum, 1.0 / self.B
        ctx.loss_kind, ctx.act_kind, ctx.act_alpha, ctx.bpreg = native.LOSS_KINDS[c.loss], act_kind, alpha, c.bpreg
        return ctx

    def run_chunk(self, X: torch.Tensor, Y: torch.Tensor, samples: torch.Tensor | None,
                  keep: torch.Tensor, emb: torch.Tensor | None, hid: list, state: list[torch.Tensor],
                  losses: torch.Tensor) -> int:
        """``n = X.shape[0]`` full-batch steps in one C call (same mathematics as ``n`` calls of
        this object after ``state[i] *= keep[t]``): X, Y ``[n, B]`` inputs / targets, samples
        ``[n, n_sample]``, keep ``[n, B]`` (or ``[n, B, 1]``), emb ``[n, B, D]`` / hid[i]
        ``[n, B, H_i]`` dropout masks (or None); state tensors ``[B, H_i]`` are updated in place;
        losses ``[n]`` gets each step's loss. Returns the number of steps run (fewer than n only
        when a step's scores were not finite: that step's loss is NaN and nothing was updated)."""
        from training import native
        n, B, C = X.shape[0], self.B, native.check_tensor
        # every address handed to C is checked first: a mistake raises here instead of crashing
        C("X", X, torch.int64, (n, B))
        C("Y", Y, torch.int64, (n, B))
        C("losses", losses, torch.float32, (n,))
        C("keep", keep, torch.float32, (n, B, 1) if keep.dim() == 3 else (n, B))
        if self.cfg.n_sample > 0:
            C("samples", samples, torch.int64, (n, self.cfg.n_sample))
        if emb is not None:
            C("emb", emb, torch.float32, (n, B, self.m.Wy.shape[1]))
        if len(hid) != len(self.m.layers) or len(state) != len(self.m.layers):
            raise ValueError(f"run_chunk: {len(self.m.layers)} layers, got {len(hid)} masks / {len(state)} states")
        for i, H in enumerate(self.m.layers):
            if hid[i] is not None:
                C(f"hid[{i}]", hid[i], torch.float32, (n, B, H))
            C(f"state[{i}]", state[i], torch.float32, (B, H))
        P = native.ptr
        hid_a = (ctypes.c_void_p * native.MAXL)(*[P(h) for h in hid])
        st_a = (ctypes.c_void_p * native.MAXL)(*[P(h) for h in state])
        done = self.native.rnn_train_chunk(
            ctypes.addressof(self.chunk), n, P(X), P(Y), P(samples) if self.cfg.n_sample > 0 else None,
            P(keep), P(emb), ctypes.addressof(hid_a), ctypes.addressof(st_a), P(losses))
        if done < 0:
            raise RuntimeError("rnn_train_chunk: no BLAS handed over, or out of memory")
        self.opt_state["step"] += done
        return int(done)

    # ---- optimizer ---------------------------------------------------------------------
    def _new_opt_state(self) -> dict[str, torch.Tensor]:
        st = {"dense.acc": torch.zeros_like(self.flat), "step": torch.zeros((), dtype=torch.int64)}
        need_mom = self.cfg.optimizer == "adam" or self.cfg.momentum > 0
        if need_mom:
            st["dense.mom"] = torch.zeros_like(self.flat)
        for k, p in self.sparse.items():
            st[f"{k}.acc"] = torch.zeros_like(p.data)
            if need_mom:
                st[f"{k}.mom"] = torch.zeros_like(p.data)
            if self.cfg.optimizer == "adam":
                st[f"{k}.t"] = torch.zeros(p.shape[0], dtype=torch.float32, device=self.device)
        return st

    def optimizer_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone().cpu() for k, v in self.opt_state.items()}

    def load_optimizer_state(self, st: dict[str, torch.Tensor]) -> None:
        for k, v in self.opt_state.items():
            if k not in st or st[k].shape != v.shape:
                raise ValueError(f"optimizer state {k!r} missing or of the wrong shape in checkpoint")
            v.copy_(st[k])

    def _dense_update(self) -> None:
        c, st, g = self.cfg, self.opt_state, self.gflat
        if c.optimizer == "adagrad" and self.native is not None:
            self.native.rnn_adagrad_rows(
                self.flat.data_ptr(), st["dense.acc"].data_ptr(),
                st["dense.mom"].data_ptr() if c.momentum > 0 else None, None, None,
                1, self.flat.numel(), g.data_ptr(), c.learning_rate, c.adagrad_eps,
                c.momentum, int(c.nesterov))
            return
        if c.optimizer == "adagrad":
            acc = st["dense.acc"]
            acc.addcmul_(g, g)
            upd = g / (acc + c.adagrad_eps).sqrt_()
            if c.momentum > 0:
                mom = st["dense.mom"]
                mom.mul_(c.momentum).add_(upd, alpha=-c.learning_rate)
                if c.nesterov:
                    self.flat.add_(mom, alpha=c.momentum).add_(upd, alpha=-c.learning_rate)
                else:
                    self.flat.add_(mom)
            else:
                self.flat.add_(upd, alpha=-c.learning_rate)
        else:  # adam
            t = int(st["step"])
            b1, b2 = 0.9, 0.999
            st["dense.mom"].mul_(b1).add_(g, alpha=1 - b1)
            st["dense.acc"].mul_(b2).addcmul_(g, g, value=1 - b2)
            mhat = st["dense.mom"] / (1 - b1 ** t)
            vhat = st["dense.acc"] / (1 - b2 ** t)
            self.flat.addcdiv_(mhat, vhat.sqrt_().add_(1e-8), value=-c.learning_rate)

    def _coalesce(self, rows: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(unique rows, position of each input row among them) without a sort: scatter
        each occurrence's position into a per-item slot, keep the rows that won their slot."""
        if self.native is not None:
            return self._coalesce2(rows, None, n)
        if self._slot is None or self._slot.shape[0] < n:
            self._slot = torch.empty(n, dtype=torch.int64, device=rows.device)
            self._compact = torch.empty(n, dtype=torch.int64, device=rows.device)
        k = rows.shape[0]
        ar = self._arange[:k] if self._arange.shape[0] >= k else torch.arange(k, device=rows.device)
        self._slot[rows] = ar  # sequential on CPU: the last occurrence wins
        uniq = rows[self._slot[rows] == ar]
        self._compact[uniq] = ar[: uniq.shape[0]]
        return uniq, self._compact[rows]

    def _coalesce2(self, a: torch.Tensor, b: torch.Tensor | None, n: int):
        """Native coalescing of the rows ``a`` followed by ``b`` (no concatenation)."""
        slot = self._nslot.get(n)
        if slot is None:
            slot = self._nslot[n] = torch.full((n,), -1, dtype=torch.int64)
        a = a.contiguous()
        kb = 0 if b is None else b.shape[0]
        k = a.shape[0] + kb
        uniq = torch.empty(k, dtype=torch.int64)
        inv = torch.empty(k, dtype=torch.int64)
        U = self.native.rnn_coalesce2(a.data_ptr(), a.shape[0],
                                      b.contiguous().data_ptr() if kb else None, kb,
                                      slot.data_ptr(), uniq.data_ptr(), inv.data_ptr())
        return uniq[:U], inv

    def _sparse_update(self, name: str, rows: torch.Tensor, vals: torch.Tensor) -> None:
        """Update only the touched rows; duplicate rows are summed first (the update is
        non-linear in the gradient, so they must be coalesced)."""
        uniq, inv = self._coalesce(rows, self.sparse[name].shape[0])
        g = torch.zeros((len(uniq),) + vals.shape[1:], device=vals.device, dtype=vals.dtype)
        g.index_add_(0, inv, vals)
        self._rows_update(name, uniq, g)

    def _rows_update(self, name: str, uniq: torch.Tensor, g: torch.Tensor,
                     mask: torch.Tensor | None = None) -> None:
        """Adagrad(+momentum) / lazy Adam on the unique rows ``uniq`` with summed grads ``g``
        (only rows with ``mask`` set, when given)."""
        c, st = self.cfg, self.opt_state
        p = self.sparse[name].data
        acc = st[f"{name}.acc"]
        if c.optimizer == "adagrad" and self.native is not None:
            g = g.contiguous()
            D = g.numel() // max(1, g.shape[0])
            self.native.rnn_adagrad_rows(
                p.data_ptr(), acc.data_ptr(),
                st[f"{name}.mom"].data_ptr() if c.momentum > 0 else None,
                uniq.data_ptr(), mask.data_ptr() if mask is not None else None,
                uniq.shape[0], D, g.data_ptr(), c.learning_rate, c.adagrad_eps,
                c.momentum, int(c.nesterov))
            return
        if mask is not None:
            sel = torch.nonzero(mask).squeeze(1)
            uniq, g = uniq.index_select(0, sel), g.index_select(0, sel)
        if c.optimizer == "adagrad":
            a = acc.index_select(0, uniq).addcmul_(g, g)
            acc.index_copy_(0, uniq, a)
            upd = g.div_(a.add_(c.adagrad_eps).sqrt_()).mul_(-c.learning_rate)
            if c.momentum > 0:
                mom = st[f"{name}.mom"]
                mo = mom.index_select(0, uniq).mul_(c.momentum).add_(upd)
                mom.index_copy_(0, uniq, mo)
                upd = mo.mul(c.momentum).add_(upd) if c.nesterov else mo
            p.index_add_(0, uniq, upd)
        else:  # lazy Adam on touched rows (each row keeps its own step count)
            b1, b2 = 0.9, 0.999
            tt = st[f"{name}.t"]
            t = tt.index_select(0, uniq).add_(1)
            tt.index_copy_(0, uniq, t)
            mom = st[f"{name}.mom"]
            mo = mom.index_select(0, uniq).mul_(b1).add_(g, alpha=1 - b1)
            mom.index_copy_(0, uniq, mo)
            v = acc.index_select(0, uniq).mul_(b2).addcmul_(g, g, value=1 - b2)
            acc.index_copy_(0, uniq, v)
            shape = (-1,) + (1,) * (g.dim() - 1)
            mhat = mo / (1 - b1 ** t).view(shape)
            vhat = v / (1 - b2 ** t).view(shape)
            p.index_add_(0, uniq, mhat.div_(vhat.sqrt_().add_(1e-8)).mul_(-c.learning_rate))

    # ---- the step ----------------------------------------------------------------------
    @torch.no_grad()
    def __call__(self, x: torch.Tensor, y: torch.Tensor, state: list[torch.Tensor],
                 masks: dict) -> torch.Tensor:
        """x [M] inputs, y [M + n_sample] (targets then extra negatives), state: per-layer
        [M, H] tensors, REPLACED in place by the new (dropped-out) states. Returns the
        loss (sum over rows / nominal batch size) as a 0-d tensor (no host sync)."""
        m, c = self.m, self.cfg
        M = x.shape[0]
        L = len(m.layers)
        emb_mask = masks.get("embed")
        hid_masks = masks.get("hidden") or [None] * L
        # forward. Output rows are coalesced first: the sampled columns repeat popular items,
        # so scoring / back-propagating over the U unique rows (U < M + n_sample) is cheaper
        # and the sparse update needs no scatter of [M + n_sample, H] gradients.
        tied = m.embedding == "tied"
        if self.native is not None:
            uniq, inv = self._coalesce2(x, y, m.n_items) if tied else self._coalesce2(y, None, m.n_items)
        else:
            uniq, inv = self._coalesce(torch.cat([x, y]) if tied else y, m.n_items)
        inv_y = inv[M:] if tied else inv
        O = m.Wy.data.index_select(0, uniq)
        if tied:
            inp = O.index_select(0, inv[:M])
        else:
            inp = m.input_vectors(x)
        if inp is not None and emb_mask is not None:
            inp = inp * emb_mask
        cache = []
        if self.native is not None and self._ngru:
            for i in range(L):
                h = state[i]
                Hs = h.shape[1]
                W_ih, W_hh, b_ih, b_hh = self._layer[i][:4]
                hm = hid_masks[i]
                hm = hm.contiguous() if hm is not None else None
                h = h.contiguous()
                inp = inp.contiguous()
                if self._mm is not None:  # the input and hidden products side by side
                    gi, gh = torch.empty(M, 3 * Hs), torch.empty(M, 3 * Hs)
                    self._mm.run([(0, 1, M, 3 * Hs, inp.shape[1], inp.data_ptr(), W_ih.data_ptr(), gi.data_ptr()),
                                  (0, 1, M, 3 * Hs, Hs, h.data_ptr(), W_hh.data_ptr(), gh.data_ptr())], 1)
                else:
                    gi = inp @ W_ih.t()  # biases are added in the kernel (cheaper than addmm's)
                    gh = h @ W_hh.t()
                out, r, z, n, ghn = (torch.empty(M, Hs) for _ in range(5))
                self.native.rnn_gru_gates_fwd(
                    gi.data_ptr(), gh.data_ptr(), b_ih.data_ptr(), b_hh.data_ptr(), h.data_ptr(),
                    hm.data_ptr() if hm is not None else None,
                    M, Hs, out.data_ptr(), r.data_ptr(), z.data_ptr(), n.data_ptr(), ghn.data_ptr())
                cache.append((inp, h, r, z, n, ghn))
                state[i] = out
                inp = out
            L = 0  # layers done
        for i in range(L):
            h = state[i]
            Hs = h.shape[1]
            if i == 0 and inp is None:
                gi = m.Wx0.data.index_select(0, x).add_(m.b_ih[0].data)
            else:
                gi = torch.addmm(m.b_ih[i].data, inp, m.W_ih[i].data.t())
            gh = torch.addmm(m.b_hh[i].data, h, m.W_hh[i].data.t())
            rz = torch.sigmoid_(gi[:, :2 * Hs].add_(gh[:, :2 * Hs]))
            r, z = rz[:, :Hs], rz[:, Hs:]
            ghn = gh[:, 2 * Hs:]
            n = torch.tanh_(torch.addcmul(gi[:, 2 * Hs:], r, ghn))
            hn = torch.lerp(n, h, z)  # n + z * (h - n)
            out = hn * hid_masks[i] if hid_masks[i] is not None else hn
            cache.append((inp, h, r, z, n, ghn))
            state[i] = out
            inp = out
        # scores are kept TRANSPOSED, [unique rows, mini-batch rows]: gathering / scattering
        # the sampled columns is then a row gather / row scatter (contiguous), ~3x cheaper on
        # CPU than the same along dim 1 (profiled, benchmarks/README_gru4rec.md)
        in_y = None
        if self.xe and self.native is not None:
            # scores [U, M] by MKL, then the fused softmax (training/native/kernels.c rnn_xe_softmax):
            # the M + n_sample columns folded onto the unique rows, loss and dS in place
            U, C = uniq.shape[0], inv_y.shape[0]
            if self._nzq.shape[0] < C:
                self._nzq = torch.empty(C)
            if U > self._ndby.shape[0]:
                self._ndby, self._nw = torch.empty(U), torch.empty(U)
                self._nin = torch.empty(U, dtype=torch.uint8)
            dBy, in_y = self._ndby[:U], self._nin[:U]
            mm = self._mm
            if mm is not None:  # scores by halves of the unique rows, one per core
                Hd = O.shape[1]
                inp = inp.contiguous()
                dS = torch.empty(U, M)
                U1 = U // 2
                mm.run([(0, 1, U1, M, Hd, O.data_ptr(), inp.data_ptr(), dS.data_ptr()),
                        (0, 1, U - U1, M, Hd, O.data_ptr() + 4 * U1 * Hd, inp.data_ptr(),
                         dS.data_ptr() + 4 * U1 * M)], 1)
            else:
                dS = O @ inp.t()  # the kernel adds the biases
            lq = self.logq_w is not None
            loss = torch.tensor(self.native.rnn_xe_softmax(
                dS.data_ptr(), self._By.data_ptr(), uniq.data_ptr(), U, M, inv_y.data_ptr(), y.contiguous().data_ptr(),
                self.logp.data_ptr() if lq else None, c.logq, c.logq * c.sample_alpha, C,
                1.0 / self.B, dBy.data_ptr(), in_y.data_ptr(), self._nw.data_ptr(),
                self._nzq.data_ptr()), dtype=torch.float32)
            if mm is not None:  # dX = dS^T O and dO = dS X side by side
                dout, dO = torch.empty(M, Hd), torch.empty(U, Hd)
                mm.run([(1, 0, M, Hd, U, dS.data_ptr(), O.data_ptr(), dout.data_ptr()),
                        (0, 0, U, Hd, M, dS.data_ptr(), inp.data_ptr(), dO.data_ptr())], 1)
            else:
                dout = dS.t() @ O
                dO = dS @ inp
        else:
            S = torch.addmm(m.By.data.index_select(0, uniq).unsqueeze(1), O, inp.t())  # [U, M]
            dout, dO, dBy, loss = self._output_grad(S, inv_y, y, uniq.shape[0], M, O, inp)
        dx = self._gru_backward(cache, dout, hid_masks, emb_mask, M)
        # updates
        self.opt_state["step"] += 1
        self._dense_update()
        if tied:
            # input rows add their gradient to the same Wy rows; By is touched only by the
            # output rows (official: a row used only as input gets no By update / momentum)
            if self.native is not None and dx.is_contiguous():
                self.native.rnn_add_rows(dO.data_ptr(), inv.data_ptr(), dx.data_ptr(), M, dx.shape[1])
            else:
                dO.index_add_(0, inv[:M], dx)
            self._rows_update("Wy", uniq, dO)
            if in_y is None:
                in_y = torch.zeros(uniq.shape[0], dtype=torch.bool, device=uniq.device)
                in_y[inv_y] = True
            if self.native is None and bool(in_y.all()):
                in_y = None
            self._rows_update("By", uniq, dBy, mask=in_y)
        else:
            self._rows_update("Wy", uniq, dO)
            self._rows_update("By", uniq, dBy)
            self._sparse_update("E" if m.embedding == "separate" else "Wx0", x, dx)
        return loss

    def _output_grad(self, S, inv_y, y, U, M, O, inp):
        """Torch path of the output layer: loss, and gradients of the GRU output, the unique
        output rows and their biases."""
        c = self.cfg
        Rt = S.index_select(0, inv_y)
        # loss and dL/dR
        if self.xe:
            if self.logq_w is not None:
                w = self.logq_w if M == self.B else torch.cat(
                    [self.logq_w[:M], self.logq_w[self.B:self.B + c.n_sample]])
                Rt.sub_(self.logp.index_select(0, y).mul_(w).unsqueeze(1))
            lse = torch.logsumexp(Rt, 0, keepdim=True)
            # the official form -log(p + 1e-24) (kernels.c xe_row_loss; issue 13): gradient
            # (softmax - one-hot) * p / (p + 1e-24) per row, ~0 for a hopeless target
            lp = Rt.diagonal().double() - lse[0].double()
            p = lp.exp()
            loss = (-(p + XE_EPS).log()).sum().float() / self.B
            g = (p / (p + XE_EPS)).float()
            dRt = Rt.sub_(lse).exp_()
            dRt.diagonal().sub_(1.0)
            dRt.mul_(g.mul_(1.0 / self.B))
        else:
            with torch.enable_grad():
                Rg = Rt.t().requires_grad_(True)
                lossg = sampled_loss(Rg, c.loss, c.final_act, c.bpreg) / self.B
                (dR,) = torch.autograd.grad(lossg, Rg)
            loss = lossg.detach()
            dRt = dR.t()
        # backward: output layer, on the unique rows
        dRt = torch.zeros(U, M, device=dRt.device).index_add_(0, inv_y, dRt)
        return dRt.t() @ O, dRt @ inp, dRt.sum(1), loss

    def _gru_backward(self, cache, dout, hid_masks, emb_mask, M):
        """GRU layers' backward: fills the dense gradients (gflat), returns the input gradient."""
        m = self.m
        L = len(m.layers)
        if self.native is not None and self._ngru:
            for i in reversed(range(L)):
                xin, h, r, z, n, ghn = cache[i]
                Hs = h.shape[1]
                hm = hid_masks[i]
                hm = hm.contiguous() if hm is not None else None
                dgi, dgh = torch.empty(M, 3 * Hs), torch.empty(M, 3 * Hs)
                dout = dout.contiguous()
                W_ih, _, _, _, gW_ih, gW_hh, gb_ih, gb_hh = self._layer[i]
                self.native.rnn_gru_gates_bwd(
                    dout.data_ptr(), hm.data_ptr() if hm is not None else None, h.data_ptr(),
                    r.data_ptr(), z.data_ptr(), n.data_ptr(), ghn.data_ptr(), M, Hs,
                    dgi.data_ptr(), dgh.data_ptr(), gb_ih.data_ptr(), gb_hh.data_ptr())
                if self._mm is not None:  # weight gradients on one core, the input gradient on the other
                    Hin = W_ih.shape[1]
                    xin = xin.contiguous()
                    dout = torch.empty(M, Hin)
                    self._mm.run([(1, 0, 3 * Hs, Hs, M, dgh.data_ptr(), h.data_ptr(), gW_hh.data_ptr()),
                                  (1, 0, 3 * Hs, Hin, M, dgi.data_ptr(), xin.data_ptr(), gW_ih.data_ptr()),
                                  (0, 0, M, Hin, 3 * Hs, dgi.data_ptr(), W_ih.data_ptr(), dout.data_ptr())], 1)
                else:
                    torch.mm(dgh.t(), h, out=gW_hh)
                    torch.mm(dgi.t(), xin, out=gW_ih)
                    dout = dgi @ W_ih
            return dout * emb_mask if emb_mask is not None else dout
        self.gflat.zero_()
        dx = None
        for i in reversed(range(L)):
            xin, h, r, z, n, ghn = cache[i]
            Hs = h.shape[1]
            dh = dout * hid_masks[i] if hid_masks[i] is not None else dout
            dgi = torch.empty(M, 3 * Hs, device=dh.device)
            dgh = torch.empty(M, 3 * Hs, device=dh.device)
            dn = dh * (1 - z)
            dpre_n = dn.mul_(1 - n * n)
            dgi[:, 2 * Hs:] = dpre_n
            torch.mul(dpre_n, r, out=dgh[:, 2 * Hs:])
            # dr = dpre_n * ghn ; d(pre_r) = dr * r(1-r) ; d(pre_z) = dh (h - n) z(1-z)
            torch.mul(dpre_n * ghn, r * (1 - r), out=dgi[:, :Hs])
            torch.mul(dh * (h - n), z * (1 - z), out=dgi[:, Hs:2 * Hs])
            dgh[:, :2 * Hs] = dgi[:, :2 * Hs]
            gW_hh = self.grad_of[id(m.W_hh[i])]
            torch.mm(dgh.t(), h, out=gW_hh)
            torch.sum(dgh, 0, out=self.grad_of[id(m.b_hh[i])])
            torch.sum(dgi, 0, out=self.grad_of[id(m.b_ih[i])])
            if i == 0 and xin is None:
                dx = dgi  # rows of Wx0
            else:
                torch.mm(dgi.t(), xin, out=self.grad_of[id(m.W_ih[i])])
                dout = dgi @ m.W_ih[i].data
                if i == 0:
                    dx = dout * emb_mask if emb_mask is not None else dout
        return dx


class FastRunner:
    """The trainer's epoch runner for GRU4Rec's fast path (same interface as
    ``training.trainer.AutogradRunner``): consumes the same chunk stream as the autograd
    path (``training.families.gru4rec.epoch_chunks``) and runs each step through
    :class:`FastStep`, or whole chunks of full-batch steps through one C call (``chunk``)."""

    def __init__(self, model, cfg, ctx, path: str, strict: bool = False):
        if path not in ("chunk", "native", "manual"):
            raise ValueError(f"FastRunner: path must be chunk|native|manual, got {path!r}")
        self.m, self.cfg, self.ctx = model, cfg, ctx
        self.step = FastStep(model, cfg, ctx.support, ctx.device, native=path != "manual", chunk=path == "chunk")
        if path == "chunk" and self.step.chunk is None:
            if strict:
                from training.config import ConfigError

                raise ConfigError("train_path=chunk: this setting has no whole-step C path (it needs tied "
                                  "embedding, cross-entropy or bpr-max (linear / ELU), Adagrad, <= 8 layers, MKL, "
                                  "RNNREC_NATIVE_CHUNK!=0); "
                                  "use train_path=native")
            path = "native"
        if path == "native" and self.step.native is None:
            path = "manual"
        self.path = path
        #: optional per-step loss record (benchmarks/gru4rec_loss_curves.py): set to a list and
        #: each epoch appends {"epoch", "loss": per-step losses, "n_valid": active slots per step};
        #: None (default) records nothing
        self.step_log: list | None = None

    def state_dict(self) -> dict:
        return self.step.optimizer_state()

    def load_state_dict(self, d: dict) -> None:
        self.step.load_optimizer_state(d)

    def run_epoch(self, epoch: int, progress=None) -> dict:
        from training.families.gru4rec import epoch_chunks
        from training.trainer import check_losses

        c, B, dev = self.cfg, self.cfg.batch_size, self.ctx.device
        state = self.m.init_state(B, dev)
        losses, n_valid = [], []
        t0 = time.perf_counter()
        done_events = 0
        n_steps = 0
        for ch in epoch_chunks(c, self.m, self.ctx, epoch):
            n = ch.c1 - ch.c0
            L = torch.zeros(n, device=dev)
            t_next = 0
            if self.step.chunk is not None and B + c.n_sample >= 2:
                # the full-batch steps of this chunk in one C call (the tail steps, where the
                # batch shrinks, stay on the per-step path below)
                full = ch.n_valid == B
                k = int(np.argmin(full)) if not full.all() else n
                if k > 0:
                    done = self.step.run_chunk(
                        ch.X[:k], ch.Y[:k], ch.samples[:k] if ch.samples is not None else None, ch.keep[:k],
                        ch.emb[:k] if ch.emb is not None else None,
                        [h[:k] if h is not None else None for h in ch.hid], state, L[:k])
                    t_next = k if done == k else n  # stopped at a non-finite loss: report it
            for k in range(t_next, n):
                M = int(ch.n_valid[k])
                emb = ch.emb[k] if ch.emb is not None else None
                hid = [h[k] if h is not None else None for h in ch.hid]
                if M == B:
                    for h in state:
                        h.mul_(ch.keep[k])
                    x, yp, sub = ch.X[k], ch.Y[k], state
                else:  # tail: sessions ran out, the batch shrinks to the active slots
                    rows = torch.nonzero(ch.Y[k] >= 0).squeeze(1)
                    sub = [h.index_select(0, rows).mul_(ch.keep[k][rows]) for h in state]
                    x, yp = ch.X[k][rows], ch.Y[k][rows]
                    emb = emb[rows] if emb is not None else None
                    hid = [h[rows] if h is not None else None for h in hid]
                y = torch.cat([yp, ch.samples[k]]) if ch.samples is not None else yp
                if y.shape[0] < 2:  # a single row with no negatives cannot be ranked
                    continue
                L[k] = self.step(x, y, sub, {"embed": emb, "hidden": hid})
                if M < B:
                    for i, h in enumerate(state):
                        h.index_copy_(0, rows, sub[i])
            check_losses(L, epoch, ch.c0)  # one host sync per chunk
            losses.append(L)
            n_valid.append(ch.n_valid)
            done_events += int(ch.n_valid.sum())
            n_steps = ch.c1
            if progress is not None:
                progress(n, float(L.mean()), done_events / max(time.perf_counter() - t0, 1e-9))
        secs = time.perf_counter() - t0
        if not losses:
            return {"epoch": epoch, "loss": float("nan"), "events": 0, "steps": 0, "seconds": secs,
                    "events_per_s": 0.0}
        L = torch.cat(losses)
        nv = torch.from_numpy(np.concatenate(n_valid).astype(np.float32)).to(dev)
        if self.step_log is not None:
            self.step_log.append({"epoch": epoch, "loss": L.cpu().tolist(), "n_valid": nv.cpu().tolist()})
        return {"epoch": epoch, "loss": float((L * nv).sum() / nv.sum()), "events": done_events,
                "steps": n_steps, "seconds": secs, "events_per_s": done_events / max(secs, 1e-9)}
