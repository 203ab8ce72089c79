// Upload progress for the submission form. Without JavaScript the form posts as a plain form.
(function () {
  var form = document.getElementById("submit-form");
  if (!form || !window.XMLHttpRequest || !window.FormData) { return; }
  form.addEventListener("submit", function (event) {
    event.preventDefault();
    var bar = document.getElementById("upload-progress");
    var status = document.getElementById("upload-status");
    var button = document.getElementById("upload");
    var request = new XMLHttpRequest();
    button.disabled = true;  // a second click would spend a second submission of the day
    bar.hidden = false;
    request.upload.addEventListener("progress", function (e) {
      if (e.lengthComputable) { bar.value = Math.round(100 * e.loaded / e.total); status.textContent = bar.value + "%"; }
    });
    request.addEventListener("load", function () {
      if (request.status >= 200 && request.status < 400 && request.responseURL) {
        window.location.assign(request.responseURL);
      } else {
        button.disabled = false;
        document.open(); document.write(request.responseText); document.close();
      }
    });
    request.addEventListener("error", function () {
      button.disabled = false;
      status.textContent = "upload failed: network error";
    });
    request.open("POST", form.action);
    request.send(new FormData(form));
  });
})();
