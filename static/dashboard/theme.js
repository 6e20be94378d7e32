// The light and the dark theme: the system's preference (prefers-color-scheme) unless the
// operator chose one with the toggle (remembered in this browser). The page's head sets the
// theme before the first paint (templates/dashboard/index.html); this keeps it in step.

const KEY = "dashboard-theme";
const media = window.matchMedia?.("(prefers-color-scheme: light)");

export function currentTheme() {
  const chosen = localStorage.getItem(KEY);
  if (chosen === "light" || chosen === "dark") return chosen;
  return media?.matches ? "light" : "dark";
}

export function initTheme(button, onChange = () => {}) {
  const apply = () => {
    const theme = currentTheme();
    document.documentElement.dataset.theme = theme;
    button.setAttribute("aria-pressed", String(theme === "light"));
    button.textContent = theme === "light" ? "Dark theme" : "Light theme";
    onChange(theme);
  };
  button.addEventListener("click", () => {
    localStorage.setItem(KEY, currentTheme() === "light" ? "dark" : "light");
    apply();
  });
  media?.addEventListener?.("change", () => {
    if (!localStorage.getItem(KEY)) apply();
  });
  apply();
}
