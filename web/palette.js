// The pack's identity palette for the browser: ID n is drawn in ID_COLORS[n % ID_COLORS.length].
// Must equal palette.py's ID_COLORS (tests/test_regions.py compares them).
export const ID_COLORS = [
    [230, 25, 75],
    [60, 180, 75],
    [0, 130, 200],
    [255, 225, 25],
    [145, 30, 180],
    [70, 240, 240],
    [245, 130, 48],
    [240, 50, 230],
    [128, 128, 0],
    [0, 128, 128],
    [170, 110, 40],
    [128, 0, 0],
    [170, 255, 195],
    [0, 0, 128],
    [250, 190, 212],
    [255, 255, 255],
];

export function idColor(n, alpha = 1) {
    const [r, g, b] = ID_COLORS[n % ID_COLORS.length];
    return `rgba(${r}, ${g}, ${b}, ${alpha})`;
}
