/**
 * A tiny DOM builder. Text always goes in as text (never as HTML): labels and names come from
 * other users and must never reach the page as markup.
 */
export type Child = Node | string | null | undefined | false;

export function h(
  tag: string,
  attrs: { [key: string]: string | undefined } = {},
  ...children: Child[]
): HTMLElement {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (value !== undefined) {
      node.setAttribute(key, value);
    }
  }
  for (const child of children) {
    if (child === null || child === undefined || child === false) {
      continue;
    }
    node.appendChild(typeof child === 'string' ? document.createTextNode(child) : child);
  }
  return node;
}

/** Replace `node`'s children. */
export function fill(node: HTMLElement, ...children: Child[]): void {
  node.replaceChildren(...(children.filter(c => c !== null && c !== undefined && c !== false) as (Node | string)[]));
}
