"""Language x expert routing statistics: counts, drops, router entropy, and mutual information.

Accumulates `Routing` records of one MoE layer together with the language of each routed token. Every routed
assignment (a token's 1st and, if kept by random routing, 2nd choice) is one sample of the pair (language,
expert); `mutual_information_bits` of that joint table says how much the expert choice tells about the language
(0: routing ignores the language; H(expert): the expert determines the language).

Shape legend: L = languages, E = experts, T = tokens, N = assignments.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from moeflow.routing.base import Routing


def entropy_bits(counts: Tensor) -> float:
    """Shannon entropy in bits of the distribution proportional to non-negative `counts` (any shape)."""
    c = counts.double().flatten()
    if bool((c < 0).any()) or not bool(torch.isfinite(c).all()):
        raise ValueError("entropy_bits needs finite, non-negative counts")
    total = float(c.sum())
    if total == 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * torch.log2(p)).sum())


def mutual_information_bits(joint_LE: Tensor) -> float:
    """I(L; E) in bits from a joint count table [L, E]: H(L) + H(E) - H(L, E) (>= 0 up to rounding)."""
    if joint_LE.dim() != 2:
        raise ValueError(f"mutual_information_bits expects a 2-D count table, got shape {tuple(joint_LE.shape)}")
    mi = entropy_bits(joint_LE.sum(1)) + entropy_bits(joint_LE.sum(0)) - entropy_bits(joint_LE)
    return max(mi, 0.0)


class LanguageRouting:
    """Running language x expert tables of one MoE layer."""

    def __init__(self, languages: list[str], num_experts: int) -> None:
        """Zeroed tables for L languages and E experts."""
        self.languages, self.num_experts = list(languages), num_experts
        shape = (len(languages), num_experts)
        self.routed_LE = torch.zeros(shape, dtype=torch.float64)  # assignments the router chose
        self.kept_LE = torch.zeros(shape, dtype=torch.float64)  # ... and capacity kept
        self.first_LE = torch.zeros(shape, dtype=torch.float64)  # first choices only
        self.tokens_L = torch.zeros(len(languages), dtype=torch.float64)
        self.fully_dropped_L = torch.zeros(len(languages), dtype=torch.float64)  # tokens with no kept assignment
        self.entropy_nats_L = torch.zeros(len(languages), dtype=torch.float64)  # sum over tokens

    def add(self, routing: Routing, lang_T: Tensor) -> None:
        """Count one forward: `lang_T[t]` is the language index of routed token t. Rows of the Routing past
        len(lang_T) (e.g. top-up rows for local groups) are ignored."""
        if routing.num_experts != self.num_experts:
            raise ValueError(f"routing has {routing.num_experts} experts, the tables {self.num_experts}")
        t = lang_T.numel()
        if t > routing.num_tokens:
            raise ValueError(f"{t} token languages for a routing of {routing.num_tokens} tokens")
        lang_T = lang_T.to(torch.long).cpu()
        if t == 0:
            return
        if t and (int(lang_T.min()) < 0 or int(lang_T.max()) >= len(self.languages)):
            raise ValueError(f"language indices must be in [0, {len(self.languages)}), got {lang_T.unique().tolist()}")
        tok_N, exp_N = routing.token_ids_N.cpu(), routing.expert_ids_N.cpu()
        real_N = tok_N < t
        lang_N = lang_T[tok_N.clamp_max(max(t - 1, 0))]
        cell_N = lang_N * self.num_experts + exp_N
        size = len(self.languages) * self.num_experts

        def count(mask_N: Tensor) -> Tensor:
            sel = cell_N[mask_N & real_N]
            return torch.bincount(sel, minlength=size).view(len(self.languages), self.num_experts).double()

        self.routed_LE += count(routing.routed_N.cpu())
        self.kept_LE += count(routing.kept_N.cpu())
        if routing.top_k > 0:
            first_N = torch.arange(tok_N.numel()) < routing.num_tokens  # slot-major: the first T are 1st choices
            self.first_LE += count(first_N & routing.routed_N.cpu())
        p_TE = routing.probs_TE.detach()[:t].double().cpu()
        h_T = -(p_TE * torch.log(p_TE.clamp_min(1e-30))).sum(-1)
        self.tokens_L += torch.bincount(lang_T, minlength=len(self.languages)).double()
        kept_T = torch.zeros(routing.num_tokens, dtype=torch.bool)
        kept_T[tok_N[routing.kept_N.cpu()]] = True
        self.fully_dropped_L += torch.bincount(lang_T[~kept_T[:t]], minlength=len(self.languages)).double()
        self.entropy_nats_L += torch.zeros(len(self.languages), dtype=torch.float64).index_add(0, lang_T, h_T)

    # ------------------------------------------------------------------ derived statistics
    def mutual_information(self) -> float:
        """I(language; expert) in bits over routed assignments."""
        return mutual_information_bits(self.routed_LE)

    def expert_entropy(self) -> float:
        """H(expert) in bits over routed assignments (log2 E when the load is uniform)."""
        return entropy_bits(self.routed_LE.sum(0))

    def normalized_mi(self) -> float:
        """I(L; E) / H(E): the fraction of the expert-choice uncertainty explained by the language."""
        h = self.expert_entropy()
        return self.mutual_information() / h if h > 0 else 0.0

    def dropped_by_language(self) -> list[float]:
        """Fraction of each language's routed assignments dropped by capacity."""
        routed, kept = self.routed_LE.sum(1), self.kept_LE.sum(1)
        return [float((r - k) / r) if r > 0 else 0.0 for r, k in zip(routed, kept)]

    def tokens_dropped_by_language(self) -> list[float]:
        """Fraction of each language's tokens none of whose assignments was kept (only the residual carries them)."""
        return [float(d / n) if n > 0 else 0.0 for d, n in zip(self.fully_dropped_L, self.tokens_L)]

    def dropped_fraction(self) -> float:
        """Fraction of all routed assignments dropped."""
        r = float(self.routed_LE.sum())
        return (r - float(self.kept_LE.sum())) / r if r > 0 else 0.0

    def entropy_by_language(self) -> list[float]:
        """Mean router entropy (bits) of each language's tokens."""
        return [float(h / n / math.log(2)) if n > 0 else 0.0 for h, n in zip(self.entropy_nats_L, self.tokens_L)]

    def router_entropy(self) -> float:
        """Mean router entropy (bits) over all tokens."""
        n = float(self.tokens_L.sum())
        return float(self.entropy_nats_L.sum()) / n / math.log(2) if n > 0 else 0.0

    def share_LE(self) -> Tensor:
        """Row-normalised routed counts: the fraction of a language's assignments that went to each expert."""
        return self.routed_LE / self.routed_LE.sum(1, keepdim=True).clamp_min(1.0)

    def summary(self) -> dict[str, object]:
        """Plain-Python statistics (JSON-able)."""
        return {
            "mi_bits": self.mutual_information(),
            "mi_first_choice_bits": mutual_information_bits(self.first_LE),
            "expert_entropy_bits": self.expert_entropy(),
            "normalized_mi": self.normalized_mi(),
            "max_mi_bits": min(entropy_bits(self.routed_LE.sum(1)), self.expert_entropy()),
            "router_entropy_bits": self.router_entropy(),
            "dropped_fraction": self.dropped_fraction(),
            "dropped_by_language": dict(zip(self.languages, self.dropped_by_language())),
            "tokens_dropped_by_language": dict(zip(self.languages, self.tokens_dropped_by_language())),
            "entropy_by_language_bits": dict(zip(self.languages, self.entropy_by_language())),
            "routed_counts": {lang: row.tolist() for lang, row in zip(self.languages, self.routed_LE.long())},
        }


def routing_markdown(stats: dict[str, LanguageRouting], shuffled: dict[str, LanguageRouting] | None = None) -> str:
    """Markdown: one summary table over layers (with the MI of `shuffled`, a label-permuted baseline, if given),
    then each layer's language x expert share table."""
    if not stats:
        return "No MoE layers: nothing was routed.\n"
    base = shuffled is not None
    lines = ["| layer | I(lang; expert) bits | I / H(expert) |" + (" MI shuffled bits |" if base else "") +
             " H(expert) bits | router entropy bits | dropped |",
             "|---|---|---|" + ("---|" if base else "") + "---|---|---|"]
    for name, s in stats.items():
        null = f" {shuffled[name].mutual_information():.4f} |" if shuffled is not None else ""
        lines.append(f"| {name} | {s.mutual_information():.3f} | {s.normalized_mi():.3f} |{null} "
                     f"{s.expert_entropy():.3f} | {s.router_entropy():.3f} | {s.dropped_fraction():.3f} |")
    for name, s in stats.items():
        e = s.num_experts
        lines += ["", f"**{name}**: share of each language's routed assignments per expert (%), fraction of its "
                      "assignments dropped, of its tokens fully dropped, mean router entropy (bits)", "",
                  "| lang | " + " | ".join(f"e{i}" for i in range(e)) + " | dropped | tokens dropped | entropy |",
                  "|---|" + "---|" * (e + 3)]
        share = s.share_LE()
        for li, lang in enumerate(s.languages):
            cells = " | ".join(f"{100 * float(v):.0f}" for v in share[li])
            lines.append(f"| {lang} | {cells} | {s.dropped_by_language()[li]:.3f} | "
                         f"{s.tokens_dropped_by_language()[li]:.3f} | {s.entropy_by_language()[li]:.2f} |")
    return "\n".join(lines) + "\n"
