// relay's status pages work without this script; it adds two things:
// refreshing the page now and then, and the retry and replay buttons.
// Those send Authorization: Bearer (the admin token, asked for once and
// kept in this tab's sessionStorage, never in a cookie): relay takes no
// change on a browser's saved Basic credentials, which another site's
// form could borrow.
"use strict";
(function () {
  var TOKEN_KEY = "relay-admin-token";
  var REFRESH_KEY = "relay-autorefresh";

  function flash(text, bad) {
    var el = document.getElementById("flash");
    if (!el) return;
    el.textContent = text;
    el.className = bad ? "error" : "";
    el.hidden = false;
  }

  function token() {
    if (document.body.dataset.auth !== "token") return null;
    var t = sessionStorage.getItem(TOKEN_KEY);
    if (!t) {
      t = window.prompt("relay's admin token (kept in this tab only):");
      if (t) sessionStorage.setItem(TOKEN_KEY, t);
    }
    return t;
  }

  function post(button) {
    var question = button.dataset.confirm;
    if (question && !window.confirm(question)) return;
    var headers = { "Accept": "application/json" };
    var t = token();
    if (document.body.dataset.auth === "token") {
      if (!t) return;
      headers.Authorization = "Bearer " + t;
    }
    button.disabled = true;
    // From the origin: a page opened as http://user:token@host/ resolves
    // relative URLs with those credentials, which fetch refuses.
    fetch(window.location.origin + button.dataset.post, { method: "POST", headers: headers, credentials: "omit" })
      .then(function (response) {
        return response.json().then(function (body) { return [response.status, body]; });
      })
      .then(function (answer) {
        var status = answer[0], body = answer[1];
        if (status === 401) sessionStorage.removeItem(TOKEN_KEY);
        if (status >= 300) {
          button.disabled = false;
          flash("relay answered " + status + ": " + (body.message || ""), true);
          return;
        }
        var row = button.closest("tr, .job");
        var cell = row && row.querySelector("[data-state]");
        if (cell && button.dataset.done) {
          cell.textContent = button.dataset.done;
          cell.className = "badge state-" + button.dataset.done;
        }
        if (body.event) {
          flash("Replayed as event " + body.event + " (" + body.jobs + " job(s)).");
          var link = document.createElement("a");
          link.href = "/events/" + encodeURIComponent(body.event);
          link.textContent = " Open it";
          document.getElementById("flash").appendChild(link);
        } else if (body.requeued !== undefined) {
          flash("Queued " + body.requeued + " dead job(s) of " + body.target + " again.");
        } else {
          flash("Job " + body.job + " is " + body.state + ".");
        }
      })
      .catch(function (e) {
        button.disabled = false;
        flash("relay did not answer: " + e, true);
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var buttons = document.querySelectorAll("button[data-post]");
    for (var i = 0; i < buttons.length; i++) {
      buttons[i].hidden = false;
      buttons[i].addEventListener("click", function (e) { post(e.currentTarget); });
    }
    var box = document.getElementById("autorefresh");
    if (box) {
      box.parentElement.hidden = false;
      box.checked = sessionStorage.getItem(REFRESH_KEY) === "on";
      box.addEventListener("change", function () {
        sessionStorage.setItem(REFRESH_KEY, box.checked ? "on" : "off");
      });
      setInterval(function () { if (box.checked) window.location.reload(); }, 15000);
    }
  });
})();
