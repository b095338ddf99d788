"""Batched L-BFGS for multinomial logistic regression heads: the fused loss/gradient evaluation and the optimiser.

``geometry.linear_probe`` fits its heads with these; see its module doc for the objective. Parameters of A heads
are rows ``[W (D x C) flattened, b (C)]`` of an (A, P) matrix.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_ARMIJO = 1e-4  # sufficient-decrease constant of the backtracking line search
_MAX_BACKTRACKS = 30
_WOLFE_CURVATURE = 0.9  # scipy's: a first step whose end slope is still steeper than this gets lengthened
_MAX_EXTRAPOLATIONS = 6
_NARROW_COLUMNS = 16  # below this many logit columns, the gradient product is formed as residual^T x


def stacked(params: Tensor, d: int, c: int) -> tuple[Tensor, Tensor]:
    """Rows [W (D x C) flattened, b (C)] of A heads as one (A x C, D) contiguous weight (the transpose of the
    (D, A x C) matrix the logits need) and (1, A x C) bias.

    The logits are formed as ``x @ weight.T`` from this layout: MKL's kernel for x (N, D) times a row-major
    (D, 10) matrix ran 1.5x slower than the same product with the (10, D) matrix transposed (48k x 1280 -> 10
    classes: 45 against 30 ms on the 2-core bench machine; 1k rows 0.9 against 0.4 ms; from ~80 columns on the
    same).
    """
    a = params.shape[0]
    w = params[:, : d * c].view(a, d, c).transpose(1, 2).reshape(a * c, d)
    return w, params[:, d * c :].reshape(1, a * c)


def loss_and_grad(x: Tensor, target: Tensor, params: Tensor, l2: Tensor, n_classes: int,
                   step: int, comm=None, n_total: int | None = None) -> tuple[Tensor, Tensor]:
    """Losses (A,) float64 and gradients (A, P) of A heads; params rows = [W (D x C) flattened, b (C)].

    The gradient is written by hand (no autograd graph): d(mean CE)/d logits = (softmax - onehot) / n,
    built in place in the logits buffer of each row chunk (one exp pass, no separate logsumexp).
    ``comm``: x is this process's shard of ``n_total`` samples; the data terms are all-reduced, so every process
    gets the loss and gradient of all samples (the penalty is added once, after).
    """
    n, d = x.shape[0] if n_total is None else n_total, x.shape[1]
    a, c = params.shape[0], n_classes
    w_flat = params[:, : d * c]
    w, b = stacked(params, d, c)
    # float64 sums: the line search compares losses that differ by ~|grad|^2 near the optimum.
    penalty = 0.5 * l2.double() * w_flat.pow(2).sum(dim=1, dtype=torch.float64)
    loss = penalty if comm is None else torch.zeros_like(penalty)
    # The gradient's product, x^T (N x D)^T times the (N, A x C) residual: with fewer than 16 columns MKL's
    # kernel for that transposed shape ran 7-8x slower than the same product computed as residual^T x
    # (48k x 1280 -> 10 classes: 0.25 s against 0.032 s on the 2-core bench machine, at 2 to 11 columns; from 12
    # on both ~0.03-0.05 s, x^T r the faster). One head of a 10-class probe is every fit of the regularisation
    # path and the refit, so residual^T x below 16 columns.
    narrow = a * c < _NARROW_COLUMNS
    grad_w = torch.zeros((a * c, d) if narrow else (d, a * c), dtype=x.dtype, device=x.device)
    grad_b = torch.zeros(a * c, dtype=x.dtype, device=x.device)
    for start in range(0, x.shape[0], step):
        xb, tb = x[start : start + step], target[start : start + step]
        # One addmm per chunk: 1.7x faster than 1024-row blocks (addmm_rows) for one head on the 2-core
        # AVX-512 bench machine, the same for 8 stacked heads.
        logits = torch.addmm(b, xb, w.T).view(-1, a, c)
        true_class = tb.view(-1, 1, 1).expand(-1, a, 1)
        true_logit = logits.gather(2, true_class)
        top = logits.amax(dim=2, keepdim=True)
        probs = logits.sub_(top).exp_()
        norm = probs.sum(dim=2, keepdim=True)
        loss += (norm.log() + top - true_logit).sum(dim=(0, 2), dtype=torch.float64) / n
        probs.div_(norm).scatter_add_(2, true_class, torch.full(true_class.shape, -1.0, dtype=x.dtype,
                                                                 device=x.device))
        residual = probs.view(-1, a * c)
        if narrow:
            grad_w.addmm_(residual.T, xb, alpha=1.0 / n)
        else:
            grad_w.addmm_(xb.T, residual, alpha=1.0 / n)
        grad_b += residual.sum(dim=0)
    grad_w = grad_w.T if narrow else grad_w
    grad_w = grad_w.reshape(d, a, c).permute(1, 0, 2).reshape(a, d * c)
    if comm is None:
        return loss, torch.cat([grad_w.add_(w_flat * l2.unsqueeze(1)), grad_b.div_(n).view(a, c)], dim=1)
    grad = comm.all_reduce(torch.cat([grad_w, grad_b.div_(n).view(a, c)], dim=1))
    grad[:, : d * c] += w_flat * l2.unsqueeze(1)
    return comm.all_reduce(loss) + penalty, grad


def batched_lbfgs(evaluate: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]], params: Tensor, head_args: Tensor,
                  max_iter: int, tol: float, history_size: int, extrapolate_first: bool = False,
                  start: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Independent L-BFGS runs, one per row of ``params`` (G, P), evaluated together.

    ``evaluate(points, args)`` returns (losses, gradients) of heads at the rows of ``points``, ``args`` being
    the matching entries of ``head_args`` (G,) (here: each head's l2). Each head
    has its own curvature pairs, initial Hessian scale and Armijo backtracking line search; a head stops when
    max |grad| <= tol, when its line search cannot decrease the loss any more (float precision reached), or
    after ``max_iter`` iterations. Finished heads are dropped from every state tensor at once, so the loop
    itself only touches contiguous views. ``extrapolate_first``: the first step (no curvature pair yet, unit
    length) is lengthened 4x at a time while the loss keeps falling and the slope stays steep (Wolfe's
    curvature condition fails), as scipy's line search does; worth it from a cold start only (measured:
    19 -> 15 evaluations on the 50k x 768 x 100 bench fit, more evaluations on warm starts).
    ``start`` = (losses, gradients) already known at ``params`` saves the first evaluation.
    Returns (params, iterations per head, losses and gradients at params).
    """
    params = params.clone()
    iterations = torch.zeros(params.shape[0], dtype=torch.long, device=params.device)
    heads = torch.arange(params.shape[0], device=params.device)
    point = params.clone()
    loss, grad = evaluate(point, head_args) if start is None else start
    final_loss, final_grad = loss.clone(), grad.clone()
    s_hist = torch.zeros((history_size, *point.shape), dtype=point.dtype, device=point.device)
    y_hist = torch.zeros_like(s_hist)
    rho = torch.zeros(history_size, len(heads), dtype=point.dtype, device=point.device)  # 0 = empty slot
    gamma = torch.zeros(len(heads), dtype=point.dtype, device=point.device)  # 0 = no curvature pair yet
    finished = grad.abs().amax(dim=1) <= tol
    for it in range(max_iter + 1):
        if bool(finished.any()) or it == max_iter:
            done = finished if it < max_iter else torch.ones_like(finished)
            params[heads[done]], final_loss[heads[done]], final_grad[heads[done]] = point[done], loss[done], grad[done]
            iterations[heads[done]] = it
            keep = ~done
            heads, head_args, point, loss, grad = heads[keep], head_args[keep], point[keep], loss[keep], grad[keep]
            s_hist, y_hist, rho, gamma = s_hist[:, keep], y_hist[:, keep], rho[:, keep], gamma[keep]
        if len(heads) == 0:
            break
        newest_first = [(it - 1 - j) % history_size for j in range(min(it, history_size))]
        q = -grad
        alphas = []
        for slot in newest_first:  # two-loop recursion, every head (row) at once
            alpha = rho[slot] * torch.linalg.vecdot(s_hist[slot], q)
            q -= alpha.unsqueeze(1) * y_hist[slot]
            alphas.append(alpha)
        fresh = gamma == 0
        direction = q * torch.where(fresh, 1.0, gamma).unsqueeze(1)
        for slot, alpha in zip(reversed(newest_first), reversed(alphas)):
            beta = rho[slot] * torch.linalg.vecdot(y_hist[slot], direction)
            direction += (alpha - beta).unsqueeze(1) * s_hist[slot]
        slope = (grad * direction).sum(dim=1, dtype=torch.float64)
        uphill = slope >= 0  # impossible with valid pairs; fall back to steepest descent
        if bool(uphill.any()):
            direction[uphill] = -grad[uphill]
            slope = torch.where(uphill, -(grad.double() ** 2).sum(dim=1), slope)
        # Without curvature information the first step has unit length (as scipy's L-BFGS-B).
        step = torch.where(fresh | uphill, (1.0 / grad.norm(dim=1).double()).clamp(max=1.0), 1.0)

        new_point = point + step.to(point.dtype).unsqueeze(1) * direction
        new_loss, new_grad = evaluate(new_point, head_args)
        rejected = new_loss > loss + _ARMIJO * step * slope
        if extrapolate_first and it == 0:
            _extrapolate(evaluate, point, loss, slope, direction, step, new_point, new_loss, new_grad, rejected,
                         head_args)
        for _ in range(_MAX_BACKTRACKS):
            if not bool(rejected.any()):
                break
            retry = rejected.nonzero().flatten()
            step[retry] *= 0.5
            trial = point[retry] + step[retry].to(point.dtype).unsqueeze(1) * direction[retry]
            trial_loss, trial_grad = evaluate(trial, head_args[retry])
            new_point[retry], new_loss[retry], new_grad[retry] = trial, trial_loss, trial_grad
            rejected[retry] = trial_loss > loss[retry] + _ARMIJO * step[retry] * slope[retry]
        stalled = rejected  # still no decrease: the loss is flat to float precision along this direction
        new_point[stalled], new_loss[stalled], new_grad[stalled] = point[stalled], loss[stalled], grad[stalled]

        s_new, y_new = new_point - point, new_grad - grad
        sy = torch.linalg.vecdot(s_new, y_new)
        valid = (sy > 1e-10 * s_new.norm(dim=1) * y_new.norm(dim=1)) & ~stalled
        slot = it % history_size
        s_hist[slot], y_hist[slot] = s_new, y_new
        rho[slot] = torch.where(valid, 1.0 / sy.clamp(min=torch.finfo(sy.dtype).tiny), 0.0)
        gamma = torch.where(valid, sy / torch.linalg.vecdot(y_new, y_new).clamp(min=torch.finfo(sy.dtype).tiny), gamma)
        point, loss, grad = new_point, new_loss, new_grad
        finished = (grad.abs().amax(dim=1) <= tol) | stalled
    return params, iterations, final_loss, final_grad


def _extrapolate(evaluate, point, loss, slope, direction, step, new_point, new_loss, new_grad, rejected,
                 head_args) -> None:
    """Lengthen accepted steps 4x at a time while the loss still falls and the slope at the new point is
    still steeper than ``_WOLFE_CURVATURE`` x the initial one; updates step and new_* in place."""
    growing = ~rejected
    for _ in range(_MAX_EXTRAPOLATIONS):
        new_slope = (new_grad * direction).sum(dim=1, dtype=torch.float64)
        growing &= new_slope < _WOLFE_CURVATURE * slope
        if not bool(growing.any()):
            return
        idx = growing.nonzero().flatten()
        longer = step[idx] * 4.0
        trial = point[idx] + longer.to(point.dtype).unsqueeze(1) * direction[idx]
        trial_loss, trial_grad = evaluate(trial, head_args[idx])
        better = trial_loss <= torch.minimum(new_loss[idx], loss[idx] + _ARMIJO * longer * slope[idx])
        take = idx[better]
        new_point[take], new_loss[take], new_grad[take], step[take] = (trial[better], trial_loss[better],
                                                                        trial_grad[better], longer[better])
        growing[idx[~better]] = False
