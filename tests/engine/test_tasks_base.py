"""The task registry (`rafmedia.engine.tasks.base`): factories take their view maker's settings as options."""
import pytest

from rafmedia.core.errors import UserError
from rafmedia.engine.encoders import create_encoder
from rafmedia.engine.tasks import create_task
from rafmedia.engine.tasks.cpc import EXEMPLAR_VIEWS
from rafmedia.engine.views import RotationViews, TwoCropViews


def test_task_factories_pass_view_options_on_and_refuse_unknown_ones_naming_the_valid_ones():
    encoder = create_encoder("cnn3d_small", width=4)
    task = create_task("rotation", encoder=encoder, crop_size=16, noise_std=0.0, hidden_dim=8)
    assert task.views == RotationViews(crop_size=16, noise_std=0.0)
    with pytest.raises(UserError, match=r"pretext task 'rotation' has no option 'noise_sdt'; did you mean "
                                        r"'noise_std'\? \(options: crop_size, encoder, head_norm, hidden_dim, "
                                        r"intensity_scale, intensity_shift, noise_std\)"):
        create_task("rotation", encoder=encoder, noise_sdt=0.1)
    # a task's own view defaults sit between the user's options and the view maker's defaults
    exemplar = create_task("exemplar", encoder=encoder, crop_size=16, gamma=0.0)
    assert exemplar.views == TwoCropViews(**{**EXEMPLAR_VIEWS, "crop_size": 16, "gamma": 0.0})
    assert exemplar.views.max_shift == 16 and exemplar.views.rotate90
