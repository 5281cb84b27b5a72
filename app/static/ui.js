// Small DOM helpers shared by the views.

/**
 * Sets a <select>'s options to `items` ([value, text] pairs), keeping the chosen value when it is
 * still there (else `preferred`, else the first). Nothing changes when the options are the same,
 * so polling never closes an open list or moves the keyboard's place.
 */
export function setOptions(select, items, { preferred = "", emptyText = "none yet" } = {}) {
  const wanted = items.length ? items : [["", emptyText]];
  const same =
    select.options.length === wanted.length &&
    wanted.every(([value, text], i) => select.options[i].value === value && select.options[i].text === text);
  const chosen = preferred || select.value;
  if (!same) select.replaceChildren(...wanted.map(([value, text]) => new Option(text, value)));
  if (wanted.some(([value]) => value === chosen)) select.value = chosen;
}

const SVG = "http://www.w3.org/2000/svg";

/** A new SVG element with the given attributes, appended to `parent` when there is one. */
export function svgElement(tag, attrs, parent) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, value);
  parent?.appendChild(node);
  return node;
}
