"""A bare training loop for the tasks' "it learns" tests (the engine's own loop is tested in test_train.py)."""
import torch

from rafmedia.engine.batches import view_batches


def train_briefly(task, volumes, *, batch_size: int, steps: int, lr: float = 2e-3, weight_decay: float = 0.01,
                  seed: int = 0) -> list[dict[str, float]]:
    """AdamW on the task's trainable parameters over `steps` batches of views; returns every step's logs."""
    batches = view_batches(volumes, task.views, batch_size=batch_size, seed=seed)
    optimizer = torch.optim.AdamW([p for p in task.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    logs = []
    for step in range(steps):
        out = task(batches(step))
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        if hasattr(task, "on_step_end"):
            task.on_step_end(step, steps)
        logs.append({key: float(value.detach() if torch.is_tensor(value) else value) for key, value in out.items()})
    return logs


def losses_of(logs: list[dict[str, float]]) -> list[float]:
    return [log["loss"] for log in logs]
