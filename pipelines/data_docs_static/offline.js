// twinv2: what GX's Data Docs did with jQuery and Bootstrap from CDNs, in plain JavaScript (no network):
// the "Show All" / "Failed Only" filter of a validation page and the "Show more info..." toggle.
// pipelines/data_docs.py copies this file to data_docs/static/offline/ and links it from every page.
document.documentElement.classList.add("js");

function twinv2ShowSucceeded(show) {
  var display = show ? "" : "none";
  document.querySelectorAll(".hide-succeeded-validation-target-child").forEach(function (el) {
    el.parentElement.style.display = display;
  });
  document.querySelectorAll(".hide-succeeded-validation-target").forEach(function (el) {
    el.style.display = display;
  });
  document.querySelectorAll(".hide-succeeded-validations-column-section-target-child").forEach(function (el) {
    var section = el.parentElement.parentElement;
    section.style.display = display;
    if (section.id) {
      document.querySelectorAll('a[href$="' + section.id + '"]').forEach(function (a) { a.style.display = display; });
    }
  });
}

function showAllValidations() { twinv2ShowSucceeded(true); }
function hideSucceededValidations() { twinv2ShowSucceeded(false); }

document.addEventListener("click", function (ev) {
  var link = ev.target.closest && ev.target.closest('a[data-toggle="collapse"]');
  var target = link && document.getElementById((link.getAttribute("href") || "").slice(1));
  if (target) {
    ev.preventDefault();
    target.classList.toggle("show");
    link.setAttribute("aria-expanded", String(target.classList.contains("show")));
  }
});
