"""Images a job stored in the artifact store, as the job page shows them.

Only images the job's own details name are served, and only to a viewer who may see
the job's model: an artifact's hash is no capability, since anyone who saw one page
could otherwise fetch another model's images by guessing or sharing hashes.
"""

from __future__ import annotations

from gauntlet.scheduler.web.html import esc, number

# details keys that hold a PNG's sha256; explain jobs list theirs under "artifacts".
TOP_LEVEL_IMAGES = ("reliability_diagram",)


def image_names(details: dict | None) -> dict[str, str]:
    """name -> sha256 of every PNG the job's details name."""
    details = details or {}
    names = {k: details[k] for k in TOP_LEVEL_IMAGES if isinstance(details.get(k), str)}
    for name, sha in (details.get("artifacts") or {}).items():
        if name.endswith("_grid") and isinstance(sha, str):
            names[name] = sha
    return names


def image_href(job_id, name: str) -> str:
    return f"/jobs/{int(job_id)}/images/{esc(name)}.png"


def explanations_html(job_id, details: dict | None) -> str:
    """One figure per explanation method: its clean/adversarial grid and its numbers."""
    per_method = (details or {}).get("explanations") or {}
    figures = []
    for method, summary in per_method.items():
        caption = (
            f"{esc(method)}: mean |attribution| clean {number(summary.get('mean_abs_clean'))}, "
            f"adversarial {number(summary.get('mean_abs_adversarial'))}; rank correlation "
            f"{number(summary.get('rank_correlation'))}"
        )
        figures.append(
            f'<figure class="explanation"><img src="{image_href(job_id, method + "_grid")}" '
            f'alt="{esc(method)} attributions, clean and adversarial">'
            f"<figcaption>{caption}</figcaption></figure>"
        )
    if not figures:
        return ""
    return '<section id="explanations"><h2>Explanations</h2>' + "".join(figures) + "</section>"
